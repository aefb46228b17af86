"""The he-inference client SDK: keys stay here, only evaluation keys and ciphertexts leave.

Example::

    from client import Client

    with Client("http://127.0.0.1:8000") as server:
        model = server.model("digits_cnn_silu")
        model.generate_keys()      # the secret key is saved owner-only, never sent
        model.upload_keys()        # once; re-sent by itself if the server lost them
        labels = model.predict_label(x)
"""

from client.client import Client, error_from_response
from client.model import KeyInfo, Model, PartialResultError, QueryStats

__all__ = [
    "Client",
    "KeyInfo",
    "Model",
    "PartialResultError",
    "QueryStats",
    "error_from_response",
]
