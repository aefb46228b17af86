"""Array files of the command line: inputs and calibration data in, results out.

Users hand the commands files that are not always what their names say (a text file named
``.npy``, a half-copied archive, an array of strings), so each is checked and refused with
one line that names the file and what is expected. Nothing is ever unpickled: numpy's own
advice for such files (``allow_pickle=True``) would run code from the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from he_inference.errors import ConfigurationError, InputError


def load_array(path: Path, key: str) -> np.ndarray:
    """A numeric array from a .npy file, or from a .npz by key (else its first array).

    Nothing is unpickled: a file that is not numpy's own format is refused, whatever its
    name.

    Raises:
        InputError: the file is missing, not a .npy or .npz file, truncated, empty, or holds
            an array that is not numeric.
    """
    if path.suffix not in (".npy", ".npz"):
        raise InputError(f"{path}: give inputs as a .npy or .npz file (numpy.save, savez)")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"{path} {what}: give the path of a {path.suffix} file")
    archive = path.suffix == ".npz"
    expected = "numpy.savez" if archive else "numpy.save"
    magic = b"PK" if archive else b"\x93NUMPY"  # a zip of .npy files, or one .npy
    with path.open("rb") as handle:
        if handle.read(len(magic)) != magic:
            raise InputError(f"{path} is not a numpy {path.suffix} file: write it with {expected}")
    try:
        if archive:
            with np.load(path, allow_pickle=False) as data:
                if not data.files:
                    raise InputError(f"{path} holds no arrays: save the inputs with numpy.savez")
                name = key if key in data.files else data.files[0]
                array = np.asarray(data[name])
        else:
            array = np.asarray(np.load(path, allow_pickle=False))
    except InputError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickled" in str(exc):
            raise InputError(
                f"{path} holds Python objects, not numbers: save a numeric array "
                f"(x.astype(np.float32)) with {expected}"
            ) from None
        raise InputError(f"{path} is truncated or damaged ({exc}): write it again") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path} is truncated or damaged ({exc}): write it again") from None
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(
            f"{path} holds an array of dtype {array.dtype}: the model takes numbers; save "
            f"a float array (x.astype(np.float32))"
        )
    return array


def prepare_output_file(path: Path) -> None:
    """Make the output file's folder now, so a bad path fails before the evaluation.

    Raises:
        ConfigurationError: the path is a folder.
        OSError: the folder cannot be made.
    """
    if path.is_dir():
        raise ConfigurationError(f"{path} is a folder: give a file name such as {path}/out.npy")
    path.parent.mkdir(parents=True, exist_ok=True)


def save_array(path: Path, values: np.ndarray) -> None:
    """Write ``values`` as .npy to exactly ``path``, whatever its suffix."""
    # Through a handle: numpy.save given a name without .npy would append the suffix.
    with path.open("wb") as handle:
        np.save(handle, values, allow_pickle=False)
