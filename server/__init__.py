"""The he-inference server: a FastAPI service that evaluates compiled circuits on ciphertexts.

``create_app(Settings(models_dir=..., key_store_dir=...))`` builds the ASGI app; the CLI's
``he-infer serve`` runs it under uvicorn.
"""

from server.app import create_app
from server.settings import Settings

__all__ = ["Settings", "create_app"]
