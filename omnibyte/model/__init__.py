"""The model: a Multiscale Byte Language Model over any number of stages of registered blocks.

``build_model(config)`` -> nn.Module; ``model(tokens)`` -> logits; ``model.generate`` / ``model.score``.
Importing this package registers ``mblm`` in MODELS and the blocks in STAGES.
"""

from __future__ import annotations

from . import blocks  # noqa: F401  (registers the stage blocks)
from .decode import sample
from .mblm import MBLM, MBLMConfig, StageConfig, StreamMeta, build_model

__all__ = ["MBLM", "MBLMConfig", "StageConfig", "StreamMeta", "build_model", "sample"]
