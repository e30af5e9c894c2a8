"""The model: a Multiscale Byte Language Model over any number of stages of registered blocks.

``build_model(config)`` -> nn.Module; ``model(tokens)`` -> logits; ``model.nll``; ``model.generate`` /
``model.score`` (through the inference component, :mod:`omnibyte.model.inference`).
Importing this package registers ``mblm`` in MODELS and the blocks in STAGES.
"""

from __future__ import annotations

from . import blocks  # noqa: F401  (registers the stage blocks)
from .inference.sampling import sample
from .mblm import MBLM, MBLMConfig, StageConfig, StreamMeta, build_model

__all__ = ["MBLM", "MBLMConfig", "StageConfig", "StreamMeta", "build_model", "sample"]
