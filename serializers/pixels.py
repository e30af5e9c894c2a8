"""``pixels``: decoded pixel values as the stream (one byte per channel value).

Pipeline: decode (libspng or Pillow, identical pixels; PNGs of every colour type and depth as 8-bit
samples: 1/2/4-bit grey scaled to 0..255, palettes looked up, 16-bit samples cut to ``v >> 8``; truncated
or corrupt files refused) -> drop alpha (composite on ``background`` unless
the crop is opaque) -> crop + resize (one Pillow resize with a box) -> mode (RGB | L) -> bit depth reduction ``v >> (8 - bits)`` (values ``0 .. 2**bits - 1``, still one byte each) -> order:

* ``raster``: rows top to bottom, pixels left to right, channels interleaved (``H, W, C`` C-order);
* ``patch``: the image is padded on the right and bottom with value 0 to multiples of ``patch``, cut into
  ``patch x patch`` tiles scanned row by row, each tile emitted in raster order (MEGABYTE's patch scan).

Optional header (``header: true``): 5 bytes ``H`` (uint16 big endian), ``W`` (uint16 BE), ``C`` (uint8)
giving the unpadded size, so a stream decodes without the config's ``size``.

Exact length, with ``(W, H)`` = ``size`` if set else the (cropped) image size and ``C`` = 3 (RGB) or 1 (L):

* ``raster``: ``L = 5 * header + H * W * C``
* ``patch``:  ``L = 5 * header + ceil(H / patch) * patch * ceil(W / patch) * patch * C``

IMAGE modality only, no markers, loss 1 on every byte. ``decode`` gives a PIL image back, exactly the
processed image when ``bits == 8`` and values rescaled as ``round(v * 255 / (2**bits - 1))`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from omnibyte.stream import ByteStream
from omnibyte.vocab import Modality

from ._image import ImageSerializer, ProcessConfig, load_pixels
from .base import SERIALIZERS

HEADER_BYTES = 5


@SERIALIZERS.register("pixels")
class PixelsSerializer(ImageSerializer):
    """Raw pixel values: crop, resize, RGB|L, bit depth 1..8, raster or patch-scan order, optional header."""

    @dataclass(frozen=True)
    class Config(ProcessConfig):
        bits: int = 8  # bits kept per channel value (8 = lossless)
        order: Literal["raster", "patch"] = "raster"
        patch: int = 8  # tile side for order=patch
        header: bool = False  # prepend H, W (uint16 BE) and C (uint8)

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 1 <= self.bits <= 8:
                raise ValueError(f"bits must be in 1..8, got {self.bits}")
            if self.patch < 1:
                raise ValueError(f"patch must be >= 1, got {self.patch}")

    def expected_length(self, width: int, height: int) -> int:
        """The exact stream length for a processed image of ``width x height`` (the formula above)."""
        cfg = self.config
        c = 3 if cfg.mode == "RGB" else 1
        if cfg.order == "patch":
            p = cfg.patch
            height, width = -(-height // p) * p, -(-width // p) * p
        return HEADER_BYTES * cfg.header + height * width * c

    def _encode(self, data: bytes) -> np.ndarray:
        cfg = self.config
        arr = np.asarray(load_pixels(data, cfg))  # (H, W) or (H, W, C) uint8
        if arr.ndim == 2:
            arr = arr[:, :, None]
        H, W, C = arr.shape
        if cfg.bits < 8:
            arr = arr >> (8 - cfg.bits)
        if cfg.order == "patch":
            arr = _to_patches(arr, cfg.patch)
        body = arr.reshape(-1)
        if not cfg.header:
            return body
        if max(H, W) > 0xFFFF:
            raise ValueError(f"image {W}x{H} too large for the pixels header (max 65535)")
        head = np.array([H >> 8, H & 0xFF, W >> 8, W & 0xFF, C], dtype=np.uint8)
        return np.concatenate([head, body])

    def decode(self, stream: ByteStream):
        """The processed image as a PIL image (RGB or L)."""
        from PIL import Image

        cfg = self.config
        raw = np.frombuffer(stream.data_bytes(Modality.IMAGE), dtype=np.uint8)
        if cfg.header:
            if raw.shape[0] < HEADER_BYTES:
                raise ValueError(f"stream {stream.id!r}: {raw.shape[0]} bytes, shorter than the pixels header")
            H, W, C = (int(raw[0]) << 8) | int(raw[1]), (int(raw[2]) << 8) | int(raw[3]), int(raw[4])
            raw = raw[HEADER_BYTES:]
        elif cfg.size is not None:
            W, H = cfg.size
            C = 3 if cfg.mode == "RGB" else 1
        else:
            raise ValueError("pixels streams without a header need the config's size to decode")
        if C not in (1, 3):
            raise ValueError(f"stream {stream.id!r}: {C} channels in the header, expected 1 or 3")
        if cfg.order == "patch":
            p = cfg.patch
            Hp, Wp = -(-H // p) * p, -(-W // p) * p
            if raw.shape[0] != Hp * Wp * C:
                raise ValueError(f"stream {stream.id!r}: {raw.shape[0]} pixel bytes, expected {Hp * Wp * C}")
            arr = raw.reshape(Hp // p, Wp // p, p, p, C).transpose(0, 2, 1, 3, 4).reshape(Hp, Wp, C)[:H, :W]
        else:
            if raw.shape[0] != H * W * C:
                raise ValueError(f"stream {stream.id!r}: {raw.shape[0]} pixel bytes, expected {H * W * C}")
            arr = raw.reshape(H, W, C)
        if cfg.bits < 8:
            levels = (1 << cfg.bits) - 1
            lut = np.round(np.arange(256) * 255.0 / levels).clip(0, 255).astype(np.uint8)
            arr = lut[arr]
        arr = np.ascontiguousarray(arr)
        return Image.fromarray(arr[:, :, 0], "L") if C == 1 else Image.fromarray(arr, "RGB")

    def decode_image(self, stream: ByteStream):
        return self.decode(stream)


def _to_patches(arr: np.ndarray, p: int) -> np.ndarray:
    """(H, W, C) -> (H/p * W/p tiles, p, p, C) in tile-row order, zero-padded to multiples of p."""
    H, W, C = arr.shape
    Hp, Wp = -(-H // p) * p, -(-W // p) * p
    if (Hp, Wp) != (H, W):
        padded = np.zeros((Hp, Wp, C), dtype=np.uint8)
        padded[:H, :W] = arr
        arr = padded
    return arr.reshape(Hp // p, p, Wp // p, p, C).transpose(0, 2, 1, 3, 4)
