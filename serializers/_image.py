"""Shared machinery of the image serializers (png, jpeg, pixels): cheap container checks, safe decoding,
the crop / resize / mode pipeline, and the :class:`ImageSerializer` base class.

Safety: every decode path first checks the file size (``max_file_bytes``) and the pixel count read from the
header (``max_pixels``) before any pixel is decompressed, so a decompression bomb costs a header parse.
Pillow is restricted to a short list of formats, and PNG / JPEG inputs get a structural check of their own
(chunk walk / marker walk, :mod:`._image_files`) and a strict decode that refuses pixel data ending before
the image does (a JPEG cut mid-scan with an EOI appended included), so truncation is caught even where
``ImageFile.LOAD_TRUNCATED_IMAGES`` was set.

Bit depth: PNGs of every colour type and depth become 8-bit samples by one rule, the same with libspng or
Pillow: 1/2/4-bit grey scaled to 0..255, palettes looked up, 16-bit samples cut to their high byte
(``v >> 8``). See :func:`load_pixels`.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from omnibyte.errors import SerializationError
from omnibyte.exif import orientation  # noqa: F401 - also this module's name for it
from omnibyte.stream import ByteStream
from omnibyte.vocab import Modality

from ._image_files import (  # noqa: F401  (re-exported: png.py, jpeg.py and qa.py import them from here)
    PNG_SIGNATURE,
    PNG_TRUNCATED,
    ImageError,
    check_jpeg,
    check_png,
    load_strict,
    looks_like,
    sniff,
)
from .base import Serializer, SerializerConfig

#: formats Pillow may open for re-encoding / pixel decoding (a short list keeps the attack surface small)
DECODE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
_RESAMPLE = {"nearest": 0, "box": 4, "bilinear": 2, "hamming": 5, "bicubic": 3, "lanczos": 1}


@dataclass(frozen=True)
class ImageConfig(SerializerConfig):
    """Options of every image serializer."""

    field: str = "image"  # sample key holding the image file bytes
    max_file_bytes: int = 32 << 20  # larger files are refused before any parsing
    max_pixels: int = 1 << 24  # width * height above this is refused from the header (bomb-safe)

    def __post_init__(self) -> None:
        if self.max_file_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("max_file_bytes and max_pixels must be positive")


@dataclass(frozen=True)
class ProcessConfig(ImageConfig):
    """Options of serializers that decode pixels (png/jpeg re-encode, pixels).

    Pipeline, in this order: decode -> drop alpha (dropped as is where the crop is fully opaque, else
    composited on ``background``) -> crop and resize in one Pillow ``resize(size, box=crop)`` (a plain crop
    without ``size``) -> mode (RGB, or L = ITU-R 601-2 luma). See :func:`load_pixels`.
    """

    crop: float = 0.0  # fraction of width and of height removed, half on each side (0.1: keep the centre 90%)
    crop_box: tuple[int, int, int, int] | None = None  # explicit (left, top, right, bottom); overrides crop
    size: tuple[int, int] | None = None  # output (width, height); None keeps the (cropped) size
    resample: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"] = "bilinear"
    # Pillow's two-step resize: an integer box reduction first while the remaining scale stays >= this gap
    # (3.0: "indistinguishable from fair resampling", max 2 levels off on CLEVR, ~40% faster); null = exact
    reducing_gap: float | None = 3.0
    mode: Literal["RGB", "L"] = "RGB"  # L = ITU-R 601-2 luma
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this colour, then dropped

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reducing_gap is not None and self.reducing_gap < 1.0:
            raise ValueError(f"reducing_gap must be >= 1.0 or null, got {self.reducing_gap}")
        if not 0.0 <= self.crop < 1.0:
            raise ValueError(f"crop must be in [0, 1), got {self.crop}")
        if self.size is not None and min(self.size) <= 0:
            raise ValueError(f"size must be positive (width, height), got {self.size}")
        if self.crop_box is not None:
            left, t, r, b = self.crop_box
            if not (0 <= left < r and 0 <= t < b):
                raise ValueError(f"crop_box must be (left, top, right, bottom) with left<right, top<bottom, "
                                 f"got {self.crop_box}")
        if any(not 0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0..255, got {self.background}")


def check_limits(cfg: ImageConfig, nbytes: int, width: int | None = None, height: int | None = None) -> None:
    if nbytes > cfg.max_file_bytes:
        raise ImageError(f"image file of {nbytes} bytes exceeds max_file_bytes={cfg.max_file_bytes}")
    if width is not None and height is not None and width * height > cfg.max_pixels:
        raise ImageError(f"image of {width}x{height} = {width * height} pixels exceeds max_pixels={cfg.max_pixels}")


# ----------------------------------------------------------------------------------------------
# decoding and processing


def check_structure(data: bytes, cfg: ImageConfig) -> str:
    """The decode paths' container check: size limits, then for PNG the chunk walk with every chunk's CRC,
    for JPEG the full marker walk; the pixel count comes from the header. Returns the kind."""
    check_limits(cfg, len(data))
    kind = sniff(data)
    if kind == "PNG":
        check_limits(cfg, len(data), *check_png(data, crc=True))
    elif kind == "JPEG":
        w, h, _ = check_jpeg(data)
        check_limits(cfg, len(data), w, h)
    return kind


def open_image(data: bytes, cfg: ImageConfig, structure: bool = True):
    """Open (lazily) with Pillow after the size limits and, with ``structure``, :func:`check_structure`."""
    from PIL import Image

    check_limits(cfg, len(data))
    if structure:
        check_structure(data, cfg)
    try:
        im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image file (formats tried: {', '.join(DECODE_FORMATS)}; first bytes "
                         f"{bytes(data[:8])!r}{looks_like(data)})") from None
    check_limits(cfg, len(data), *im.size)
    return im


def decode(im, data: bytes) -> None:
    """Load the pixels of ``im`` (opened from ``data``): PNG and JPEG through :func:`load_strict`, which
    refuses incomplete pixel data whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says. Raises ImageError."""
    from PIL import Image

    try:
        if im.format in ("PNG", "JPEG"):
            load_strict(im, data)
        else:
            im.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"{im.format} does not decode: {type(e).__name__}: {e}") from None


def verify_decodes(data: bytes, cfg: ImageConfig, kind: str) -> None:
    """Full pixel decode with Pillow (the ``verify: decode`` passthrough check; structure already checked)."""
    decode(open_image(data, cfg, structure=False), data)


def load_pixels(data: bytes, cfg: ProcessConfig):
    """File bytes -> processed PIL image (RGB or L): 8 bits -> drop alpha -> crop + resize -> mode.

    Crop and resize are one Pillow ``resize(size, box=crop)`` (the filter sees the pixels just outside the
    crop, so its edges are not clamped); without ``size`` the crop is a plain crop. Alpha is composited on
    ``background`` unless every pixel inside the crop is opaque, in which case it is dropped as is.

    Bit depth: every PNG colour type and depth is read as 8-bit samples the same way: 1, 2 and 4-bit grey
    scaled to 0..255 (``v * 255 / (2**d - 1)``), palettes looked up (8-bit entries), and 16-bit samples
    (grey, grey+alpha, RGB, RGBA) cut to their high byte, ``v >> 8`` (what Pillow does for 16-bit colour,
    applied here to 16-bit grey as well). tRNS colour keys of grey and RGB PNGs are ignored (a palette's
    tRNS alpha is composited).

    Decoders: 8-bit grey, RGB and RGBA PNGs are decoded with libspng (``pyspng``) when it is installed,
    about 1.4x faster than Pillow; every other PNG (palette, grey+alpha, 1/2/4/16-bit), and every PNG with
    ``OMNIBYTE_NO_SPNG=1``, goes through Pillow. PNG decoding is lossless and both paths apply the same
    operations, so every file gives the same pixels, or the same refusal, with either (a test checks every
    colour type and depth). Files are refused on a CRC error in any chunk and when the image data stops
    early; zlib's Adler-32 is not checked (libspng does not; the CRCs cover the same bytes). JPEG inputs use ``Image.draft`` (DCT scaling at 1/2, 1/4 or 1/8) when the target is at most
    half the crop in both directions: faster, deterministic for a given libjpeg, the crop box scaled to
    match; a JPEG whose scan data ends before the image is complete is refused (:func:`load_strict`).

    EXIF orientation (a JPEG's APP1, a PNG's eXIf or a WEBP's EXIF chunk: tag 274, values 2-8; a WEBP's used to
    be ignored, so the same photo came out turned one way as JPEG and another as WEBP): the image is turned and mirrored to
    how it displays before the crop, so ``crop``, ``crop_box`` and ``size`` are in displayed coordinates and the
    output (re-encoded file or pixels, which carry no metadata) shows what a viewer shows; ``passthrough`` keeps
    the file and its tag. An EXIF block Pillow cannot read counts as orientation 1.
    """
    from PIL import Image

    kind = check_structure(data, cfg)
    spng = _pyspng() if kind == "PNG" else None
    # bit depth 8; grey, RGB, RGBA; no eXIf chunk (its orientation is applied on the Pillow path)
    if spng is not None and data[24] == 8 and data[25] in (0, 2, 6) and b"eXIf" not in data:
        w, h = struct.unpack_from(">II", data, 16)
        try:
            arr = spng.load(data)
        except Exception as e:
            raise ImageError(PNG_TRUNCATED if "too short" in str(e) else f"cannot decode PNG: {e}") from None
        box = crop_box(cfg, w, h)
        if arr.ndim == 3 and arr.shape[2] == 4 and arr[box[1]:box[3], box[0]:box[2], 3].min() == 255:
            # opaque RGBA: Pillow stores RGB as RGBX, so the decoded buffer is mapped without a copy
            im = Image.frombuffer("RGBX", (w, h), arr, "raw", "RGBX", 0, 1)
        else:
            mode = "L" if arr.ndim == 2 else ("L", "LA", "RGB", "RGBA")[arr.shape[2] - 1]
            im = drop_alpha(Image.frombuffer(mode, (w, h), arr, "raw", mode, 0, 1), cfg.background, box)
        return _finish(im, box, cfg)
    im = open_image(data, cfg, structure=False)
    W, H = im.size
    # EXIF orientation (JPEG APP1; a PNG's eXIf or WEBP's EXIF chunk is read with the pixels): the pixels as displayed, then the
    # crop, in displayed coordinates (such a JPEG is decoded at full scale)
    turned = im.format == "JPEG" and orientation(im) != 1
    box = None
    if im.format == "JPEG" and cfg.size is not None and not turned:
        box = crop_box(cfg, W, H)
        bw, bh = box[2] - box[0], box[3] - box[1]
        if min(bw // cfg.size[0], bh // cfg.size[1]) >= 2:
            im.draft(None, (W * cfg.size[0] // bw, H * cfg.size[1] // bh))
            if im.size != (W, H):  # the crop box follows the reduced scale
                box = draft_box(box, (W, H), im.size)
    decode(im, data)
    if turned or (im.format != "JPEG" and orientation(im) != 1):  # PNG eXIf, WEBP EXIF chunk, ...
        from PIL import ImageOps

        im = ImageOps.exif_transpose(im)
        box = crop_box(cfg, *im.size)
    elif box is None:
        box = crop_box(cfg, W, H)
    ibox = tuple(int(round(v)) for v in box)
    return _finish(drop_alpha(im, cfg.background, ibox), box, cfg)


def draft_box(box, full: tuple[int, int], scaled: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` (full-size pixels) in the pixels of a JPEG decoded with DCT scaling (``Image.draft``): libjpeg
    scales by exactly 1/d (d = 2, 4 or 8) and rounds the size up, so pixel i of the scaled image covers full pixels
    [i d, (i + 1) d). (Scaling by ``scaled / full`` instead shifted the box by up to one scaled pixel when the width
    or height is not a multiple of d: 126/1001 for 1/8 of a 1001-pixel width.)"""
    d = next((d for d in (2, 4, 8) if -(-full[0] // d) == scaled[0] and -(-full[1] // d) == scaled[1]), None)
    if d is None:
        raise ImageError(f"a JPEG decoded by DCT scaling at {scaled[0]}x{scaled[1]} from {full[0]}x{full[1]}: not "
                         f"a scale of 1/2, 1/4 or 1/8")
    return tuple(v / d for v in box)


def _finish(im, box, cfg: ProcessConfig):
    """Crop + resize in one pass, then the output mode; strip metadata."""
    full = tuple(box) == (0, 0, im.size[0], im.size[1])
    if cfg.size is not None and (not full or tuple(cfg.size) != im.size):
        im = im.resize(tuple(cfg.size), _RESAMPLE[cfg.resample], box=None if full else box,
                       reducing_gap=cfg.reducing_gap)
    elif not full:
        im = im.crop(tuple(int(round(v)) for v in box))
    if im.mode != cfg.mode:
        im = im.convert(cfg.mode)
    im.info = {}  # no metadata travels into re-encoded files
    return im


_SPNG: Any = False


def _pyspng():
    """The optional libspng binding (``pip install pyspng``), or None; OMNIBYTE_NO_SPNG=1 disables it."""
    global _SPNG
    if _SPNG is False:
        import os

        _SPNG = None
        if os.environ.get("OMNIBYTE_NO_SPNG", "") in ("", "0"):
            try:
                import pyspng

                _SPNG = pyspng
            except ImportError:
                pass
    return _SPNG


def crop_box(cfg: ProcessConfig, W: int, H: int) -> tuple[int, int, int, int]:
    if cfg.crop_box is not None:
        left, t, r, b = cfg.crop_box
        if r > W or b > H:
            raise ImageError(f"crop_box {cfg.crop_box} exceeds the {W}x{H} image")
        return (left, t, r, b)
    if cfg.crop == 0:
        return (0, 0, W, H)
    dx, dy = int(round(W * cfg.crop / 2)), int(round(H * cfg.crop / 2))
    if W - 2 * dx <= 0 or H - 2 * dy <= 0:
        raise ImageError(f"crop={cfg.crop} leaves nothing of the {W}x{H} image")
    return (dx, dy, W - dx, H - dy)


_GREY16 = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes for a 16-bit grey PNG (I in older Pillow)


def drop_alpha(im, background: tuple[int, int, int], box: tuple[int, int, int, int] | None = None):
    """Remove transparency: alpha that is fully opaque inside ``box`` (default: everywhere) is dropped as
    is, anything else is composited on ``background``. Returns an image of mode RGB, RGBX or L.

    Also brings every mode to 8 bits: palettes are looked up, 16-bit grey keeps each sample's high byte."""
    from PIL import Image

    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in _GREY16:  # 16-bit grey PNG: the high byte of each sample, as Pillow reads 16-bit colour
        im = Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    elif im.mode == "F":
        raise ImageError("unsupported image mode F (floating point)")
    elif im.mode not in ("RGB", "RGBX", "L", "RGBA", "LA"):
        im = im.convert("RGBA" if im.mode in ("RGBa", "La", "PA") else "RGB")
    if im.mode in ("RGBA", "LA"):
        alpha = im.getchannel("A")
        if box is not None and tuple(box) != (0, 0, im.size[0], im.size[1]):
            alpha = alpha.crop(box)
        if alpha.getextrema() == (255, 255):
            return im.convert("RGB" if im.mode == "RGBA" else "L")
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im


def image_bytes(sample: Mapping[str, Any], field: str) -> bytes:
    try:
        data = sample[field]
    except KeyError:
        raise ImageError(f"sample has no {field!r} field (keys: {', '.join(map(str, sample))})") from None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data) if not isinstance(data, bytes) else data
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        return data.tobytes()
    raise ImageError(f"field {field!r} must hold the image file bytes, got {type(data).__name__}")


# ----------------------------------------------------------------------------------------------


class ImageSerializer(Serializer):
    """Base of serializers that turn image file bytes into IMAGE-modality bytes (no markers).

    Subclasses implement ``_encode(data: bytes) -> bytes | np.ndarray`` (raising ImageError); this class
    adds the size limits, error naming and stream construction.
    """

    Config = ImageConfig
    modality = Modality.IMAGE
    is_image = True

    def serialize(self, sample: Mapping[str, Any]) -> ByteStream:
        sid = str(sample.get("id", ""))
        try:
            data = image_bytes(sample, self.config.field)
        except ImageError as e:
            raise self.fail(sid, str(e)) from None
        return self.encode_image(data, sid)

    def encode_image(self, data: bytes, sample_id: str = "") -> ByteStream:
        """Image file bytes -> IMAGE-modality ByteStream (loss 1 everywhere)."""
        return ByteStream.from_bytes(self.image_payload(data, sample_id), Modality.IMAGE, id=str(sample_id))

    def image_payload(self, data: bytes, sample_id: str = "") -> bytes | np.ndarray:
        """The stream's bytes alone (bytes or a uint8 array), for composing serializers such as qa."""
        try:
            return self._encode(data)
        except ImageError as e:
            raise SerializationError(str(sample_id), str(e), self.name) from None
        except SerializationError:
            raise
        except Exception as e:  # anything a decoder throws still names the sample
            raise SerializationError(str(sample_id), f"{type(e).__name__}: {e}", self.name) from e

    def _encode(self, data: bytes) -> bytes | np.ndarray:
        raise NotImplementedError

    def decode(self, stream: ByteStream) -> Any:
        """The image part of a stream: the file bytes (png, jpeg) or a PIL image (pixels)."""
        return stream.data_bytes(Modality.IMAGE)

    def decode_image(self, stream: ByteStream):
        """The stream's image as a PIL image (for inspection and plots)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.decode(stream)))
