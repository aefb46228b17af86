#!/usr/bin/env bash
# Create or refresh .venv with he-inference installed in editable mode.
#
# CPython 3.10 is preferred because the openfhe wheel carries an extension built for 3.10
# only; on 3.11 or 3.12 the project installs and runs with SEAL alone. Set PYTHON to force
# an interpreter. Re-running is cheap: the stamp records what the venv was built from
# (pyproject.toml and the interpreter) and nothing is reinstalled while it matches.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.bootstrap-stamp"

say() { printf 'bootstrap: %s\n' "$*"; }

# The major.minor of an interpreter, or nothing when it does not run (a pyenv shim for a
# version that is not selected exits non-zero, so being on PATH proves nothing).
version_of() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

find_python310() {
    local candidate root
    local -a candidates=()
    if command -v python3.10 >/dev/null 2>&1; then
        candidates+=("$(command -v python3.10)")
    fi
    if command -v pyenv >/dev/null 2>&1 && root=$(pyenv root 2>/dev/null); then
        candidates+=("$root"/versions/3.10.*/bin/python)
    fi
    candidates+=(/root/.pyenv/versions/3.10.*/bin/python)
    for candidate in "${candidates[@]}"; do
        if [[ -x "$candidate" && "$(version_of "$candidate")" == "3.10" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

find_fallback_python() {
    local candidate version
    for candidate in python3 python3.12 python3.11; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        version=$(version_of "$candidate")
        if [[ "$version" == "3.11" || "$version" == "3.12" ]]; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ -n "${PYTHON:-}" ]]; then
    python=$PYTHON
elif ! python=$(find_python310); then
    if ! python=$(find_fallback_python); then
        say "no CPython 3.10, 3.11 or 3.12 found: install Python 3.10 (pyenv install 3.10)" >&2
        exit 1
    fi
fi
version=$(version_of "$python")
if [[ -z "$version" ]]; then
    say "$python does not run" >&2
    exit 1
fi

extras="dev,bench"
if [[ "$version" == "3.10" ]]; then
    extras="$extras,openfhe"
else
    say "OpenFHE is unavailable on Python $version (its wheel supports only 3.10):" \
        "continuing with SEAL only"
fi

wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) python$version extras=$extras"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" && -x "$VENV/bin/python" ]] \
    && [[ "$(version_of "$VENV/bin/python")" == "$version" ]]; then
    say ".venv is up to date (Python $version)"
    touch "$STAMP"
    exit 0
fi

start=$SECONDS
if [[ -x "$VENV/bin/python" && "$(version_of "$VENV/bin/python")" != "$version" ]]; then
    say "rebuilding .venv: it has Python $(version_of "$VENV/bin/python"), wanted $version"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating .venv with $python (Python $version)"
    if ! "$python" -m venv "$VENV"; then
        say "'$python -m venv' failed: install the venv module (apt-get install python3-venv)" >&2
        exit 1
    fi
fi

say "installing he-inference[$extras] in editable mode (a few minutes the first time)"
rm -f "$STAMP"
log="$VENV/pip-install.log"
if ! "$VENV/bin/python" -m pip install -e ".[$extras]" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    say "pip install failed: the full log is $log" >&2
    exit 1
fi

if "$VENV/bin/python" -c 'import openfhe' >/dev/null 2>&1; then
    say "OpenFHE works: the openfhe backend is available"
else
    say "OpenFHE does NOT import here: the openfhe backend is unavailable, SEAL only" \
        "(OpenFHE needs Python 3.10)"
fi
if ! "$VENV/bin/python" -c 'import tenseal.sealapi' >/dev/null 2>&1; then
    say "tenseal does not import: the seal backend is unavailable" >&2
    exit 1
fi

echo "$wanted" >"$STAMP"
say "done in $((SECONDS - start)) s"
