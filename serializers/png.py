"""``png``: PNG file bytes as the stream, passed through or deterministically re-encoded.

Output length (IMAGE-modality bytes only, no markers, loss 1 on every byte):

* ``method: passthrough``: ``L = len(file)``, the input file unchanged, byte for byte.
* ``method: reencode``: the processed image (crop, alpha dropped, mode, resize) written by omnibyte's own
  minimal PNG writer (:func:`serializers._png_writer.encode_png`): exactly the chunks ``IHDR, IDAT, IEND`` (no
  metadata: no tEXt, pHYs, iCCP, gAMA, ...), 8-bit RGB (colour type 2) or L (colour type 0),
  non-interlaced, one IDAT holding the zlib stream (``compress_level``, ``strategy``, 32 KiB window) of
  the ``H * (1 + W * C)`` filtered bytes, so ``L = 57 + len(zlib stream)`` (8 signature + 25 IHDR + 12 IDAT framing + 12 IEND).
  The zlib length is data dependent (no closed form); ``decode(stream)`` gives that file back.

Input: every PNG colour type and bit depth, read as 8-bit samples by one rule with libspng or Pillow:
1/2/4-bit grey scaled to 0..255, palettes looked up, 16-bit samples (grey, grey+alpha, RGB, RGBA) cut to
their high byte ``v >> 8``. Re-encoding refuses files with any chunk CRC wrong or image data that stops
early; ``verify: decode`` likewise (see :func:`serializers._image.load_pixels`).

Determinism: passthrough is the identity. Re-encoding depends only on the sample, the config, the
decoded pixels (lossless for PNG inputs, whichever decoder), Pillow's resampling and zlib's
compressor; the same versions always write the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._image import (
    ImageSerializer,
    ProcessConfig,
    check_limits,
    check_png,
    load_pixels,
    verify_decodes,
)
from ._png_writer import encode_png
from .base import SERIALIZERS


@SERIALIZERS.register("png")
class PNGSerializer(ImageSerializer):
    """PNG file bytes: passthrough (checked) or deterministic re-encode (crop, resize, mode, no metadata)."""

    @dataclass(frozen=True)
    class Config(ProcessConfig):
        method: Literal["passthrough", "reencode"] = "passthrough"
        # passthrough checks: structure = signature + chunk walk to IEND (cheap, catches truncation);
        # crc = also every chunk CRC; decode = also a full pixel decode with Pillow (slow)
        verify: Literal["structure", "crc", "decode"] = "structure"
        compress_level: int = 6  # zlib level 0..9 of re-encoded files
        # PNG row filter of re-encoded files: one for all rows, or adaptive (per row, min sum |residual|)
        filter: Literal["none", "sub", "up", "average", "paeth", "adaptive"] = "adaptive"
        # zlib strategy of re-encoded files: filtered = libpng's choice for filtered rows (smallest files);
        # rle = about 10x faster compression for a few percent more bytes; default; huffman (no matching)
        strategy: Literal["filtered", "default", "rle", "huffman"] = "filtered"

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 <= self.compress_level <= 9:
                raise ValueError(f"compress_level must be in 0..9, got {self.compress_level}")

    def _encode(self, data: bytes) -> bytes:
        cfg = self.config
        if cfg.method == "passthrough":
            check_limits(cfg, len(data))
            w, h = check_png(data, crc=cfg.verify != "structure")
            check_limits(cfg, len(data), w, h)
            if cfg.verify == "decode":
                verify_decodes(data, cfg, "PNG")
            return data
        return encode_png(load_pixels(data, cfg), cfg.compress_level, cfg.filter, cfg.strategy)
