"""omnibyte: multimodal byte-level language modelling.

``from omnibyte import build_model`` builds a fresh model from a config; ``from omnibyte import load_run`` loads a
trained run (``load_run("runs/x", checkpoint="best")``). Both load lazily (PEP 562): ``import omnibyte`` stays
cheap and imports no submodule.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: lazily loaded public names -> the module that defines them
_LAZY = {"build_model": "omnibyte.model", "load_run": "omnibyte.run", "evaluate_run": "omnibyte.run"}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omnibyte' has no attribute {name!r}")
