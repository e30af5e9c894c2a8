"""omnibyte: multimodal byte-level language modelling.

``from omnibyte import build_model`` is the model entry point; everything heavy loads lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["build_model", "__version__"]


def __getattr__(name: str):
    if name == "build_model":
        from .model import build_model

        return build_model
    raise AttributeError(f"module 'omnibyte' has no attribute {name!r}")
