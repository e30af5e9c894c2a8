"""Noise-robustness evaluation: corruptions of text, image files and image bytes (:mod:`.corruptions`), and
a trained run scored on clean and corrupted copies of its eval split (:mod:`.evaluate`, ``omnibyte
robustness``)."""

from .corruptions import (  # noqa: F401
    CORRUPTIONS,
    Corruption,
    corrupt_image_file,
    corrupt_stream,
    corrupt_text,
    parse,
    rng_for,
)
