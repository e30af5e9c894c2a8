"""``jpeg``: JPEG file bytes as the stream, passed through or deterministically re-encoded.

Output length (IMAGE-modality bytes only, no markers, loss 1 on every byte):

* ``method: passthrough``: ``L = len(file)``, the input file unchanged, byte for byte.
* ``method: reencode``: ``L = len(JPEG written by Pillow/libjpeg)`` for the processed image: data dependent
  (entropy coded), no closed form; ``decode(stream)`` gives exactly that file back. The file is baseline
  (not progressive), not optimised, with the JFIF APP0 header Pillow always writes and no other metadata
  (no EXIF, ICC profile or comment), the standard quantisation tables scaled by ``quality`` and the
  configured chroma subsampling.

Checks: ``verify: structure`` (passthrough default, cheap) walks the segments to the first scan and wants
EOI as the last two bytes; it reads no scan data. ``verify: decode`` and every decoding path (re-encode,
``pixels``, ``qa`` over them) walk every scan to EOI and decode strictly: a file without EOI, with bytes
after EOI, with a scan short of its restart markers or of full precision (progressive cut at a scan
boundary), or whose entropy-coded data stops before the image is complete (cut mid-scan, EOI appended;
libjpeg would fill the rest with grey and only warn) is refused, naming the sample. See
:mod:`serializers._image_files` for the one blind spot (the last block or two of a scan).

Determinism: passthrough is the identity; re-encoding depends only on the sample, the config and the
Pillow / libjpeg build. JPEG inputs are decoded with DCT scaling (``Image.draft``) when the target size is
at most half the crop, which is also deterministic for a given libjpeg.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

from ._image import (
    ImageError,
    ImageSerializer,
    ProcessConfig,
    check_jpeg,
    check_limits,
    load_pixels,
    verify_decodes,
)
from .base import SERIALIZERS

_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


@SERIALIZERS.register("jpeg")
class JPEGSerializer(ImageSerializer):
    """JPEG file bytes: passthrough (checked) or deterministic re-encode (quality, subsampling, no metadata)."""

    @dataclass(frozen=True)
    class Config(ProcessConfig):
        method: Literal["passthrough", "reencode"] = "passthrough"
        # passthrough checks: structure = SOI, marker walk to the first scan, EOI at the end (cheap);
        # decode = every scan walked to EOI (nothing after it) and a strict full decode (slow)
        verify: Literal["structure", "decode"] = "structure"
        allow_progressive: bool = True  # passthrough of progressive JPEGs (re-encodes are always baseline)
        quality: int = 90  # 1..95 (libjpeg quality scaling of the standard tables)
        subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = "4:2:0"

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 1 <= self.quality <= 95:
                raise ValueError(f"quality must be in 1..95, got {self.quality}")

    def _encode(self, data: bytes) -> bytes:
        cfg = self.config
        if cfg.method == "passthrough":
            check_limits(cfg, len(data))
            w, h, progressive = check_jpeg(data, scans=cfg.verify == "decode")
            check_limits(cfg, len(data), w, h)
            if progressive and not cfg.allow_progressive:
                raise ImageError("progressive JPEG refused (allow_progressive=false)")
            if cfg.verify == "decode":
                verify_decodes(data, cfg, "JPEG")
            return data
        im = load_pixels(data, cfg)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=cfg.quality, subsampling=_SUBSAMPLING[cfg.subsampling],
                optimize=False, progressive=False)
        return buf.getvalue()
