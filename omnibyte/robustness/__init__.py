"""Noise-robustness evaluation: corruptions of text, image files and image bytes (:mod:`.corruptions`), and
a trained run scored on clean and corrupted copies of its eval split (:mod:`.evaluate`, ``omnibyte
robustness``)."""

from .corruptions import *  # noqa: F403  (its public names: corruptions.__all__, kept there once)
from .corruptions import __all__  # noqa: F401
