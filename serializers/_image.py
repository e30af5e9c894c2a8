"""Shared machinery of the image serializers (png, jpeg, pixels): cheap container checks, safe decoding,
the crop / resize / mode pipeline, and the :class:`ImageSerializer` base class.

Safety: every decode path first checks the file size (``max_file_bytes``) and the pixel count read from the
header (``max_pixels``) before any pixel is decompressed, so a decompression bomb costs a header parse.
Pillow is restricted to a short list of formats, and PNG / JPEG inputs get a structural check of their own
(chunk walk / marker walk), so truncation is caught even where ``ImageFile.LOAD_TRUNCATED_IMAGES`` was set.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from omnibyte.errors import SerializationError
from omnibyte.stream import ByteStream
from omnibyte.vocab import Modality

from .base import Serializer, SerializerConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: formats Pillow may open for re-encoding / pixel decoding (a short list keeps the attack surface small)
DECODE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
_RESAMPLE = {"nearest": 0, "box": 4, "bilinear": 2, "hamming": 5, "bicubic": 3, "lanczos": 1}


class ImageError(ValueError):
    """Internal: why an image was refused (turned into a SerializationError naming the sample)."""


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


# ----------------------------------------------------------------------------------------------
# container checks (no pixel decoding)


def sniff(data: bytes) -> str:
    """'PNG', 'JPEG' or '' from the first bytes."""
    if data[:8] == PNG_SIGNATURE:
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    return ""


def check_png(data: bytes, crc: bool = False) -> tuple[int, int]:
    """Walk the PNG chunks: signature, IHDR first, at least one IDAT, IEND last and nothing after it.

    Returns (width, height) from IHDR. ``crc=True`` also verifies every chunk's CRC-32.
    Raises ImageError with the reason.
    """
    n = len(data)
    if data[:8] != PNG_SIGNATURE:
        raise ImageError(f"not a PNG file (first bytes {bytes(data[:8])!r}{_looks_like(data)})")
    pos = 8
    width = height = 0
    seen_idat = False
    first = True
    unpack = struct.unpack_from
    while True:
        if pos + 12 > n:
            raise ImageError(f"truncated PNG: chunk header at byte {pos} runs past the end ({n} bytes); no IEND")
        length, ctype = unpack(">I4s", data, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n:
            raise ImageError(f"truncated PNG: chunk {ctype!r} at byte {pos} needs {length} bytes, file has "
                             f"{n - pos - 12} left")
        if crc and zlib.crc32(data[pos + 4:pos + 8 + length]) != unpack(">I", data, pos + 8 + length)[0]:
            raise ImageError(f"corrupt PNG: CRC mismatch in chunk {ctype!r} at byte {pos}")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise ImageError(f"corrupt PNG: first chunk is {ctype!r} (length {length}), expected IHDR")
            width, height = unpack(">II", data, pos + 8)
            if width == 0 or height == 0:
                raise ImageError(f"corrupt PNG: IHDR size {width}x{height}")
            first = False
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            if not seen_idat:
                raise ImageError("corrupt PNG: IEND before any IDAT chunk")
            if end != n:
                raise ImageError(f"PNG has {n - end} bytes after IEND")
            return width, height
        pos = end


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def check_jpeg(data: bytes) -> tuple[int, int, bool]:
    """Walk the JPEG markers up to the first SOS: SOI, well-formed segments, a frame header (SOF) before
    the scan, and EOI as the last two bytes. Returns (width, height, progressive). Raises ImageError."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise ImageError(f"not a JPEG file (first bytes {bytes(data[:8])!r}{_looks_like(data)})")
    pos = 2
    size = None
    progressive = False
    while True:
        if pos + 2 > n:
            raise ImageError(f"truncated JPEG: no start of scan (ended at byte {pos})")
        if data[pos] != 0xFF:
            raise ImageError(f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0x00):
            raise ImageError(f"corrupt JPEG: unexpected marker 0xff{marker:02x} at byte {pos} before the scan")
        if pos + 4 > n:
            raise ImageError(f"truncated JPEG: segment header at byte {pos}")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > n:
            raise ImageError(f"{'truncated' if length >= 2 else 'corrupt'} JPEG: segment 0xff{marker:02x} at "
                             f"byte {pos} has length {length}, {n - pos - 2} bytes left")
        if marker in _SOF:
            if length < 8:
                raise ImageError(f"corrupt JPEG: frame header of length {length}")
            height, width = struct.unpack_from(">HH", data, pos + 5)
            if width == 0 or height == 0:
                raise ImageError(f"unsupported JPEG: frame size {width}x{height} (DNL height is not supported)")
            size = (width, height)
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
        elif marker == 0xDA:
            if size is None:
                raise ImageError("corrupt JPEG: start of scan before any frame header (SOF)")
            if n - (pos + 2 + length) < 2 or data[-2:] != b"\xff\xd9":
                raise ImageError("truncated JPEG: the file does not end with EOI (0xffd9)")
            return size[0], size[1], progressive
        pos += 2 + length


def _looks_like(data: bytes) -> str:
    head = bytes(data[:16])
    for sig, name in ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "RIFF/WEBP"), (b"\xff\xd8", "JPEG"),
                      (PNG_SIGNATURE, "PNG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")):
        if head.startswith(sig):
            return f"; looks like {name}"
    if not head:
        return "; empty"
    return ""


def check_limits(cfg: ImageConfig, nbytes: int, width: int | None = None, height: int | None = None) -> None:
    if nbytes > cfg.max_file_bytes:
        raise ImageError(f"image file of {nbytes} bytes exceeds max_file_bytes={cfg.max_file_bytes}")
    if width is not None and height is not None and width * height > cfg.max_pixels:
        raise ImageError(f"image of {width}x{height} = {width * height} pixels exceeds max_pixels={cfg.max_pixels}")


# ----------------------------------------------------------------------------------------------
# decoding and processing


def open_image(data: bytes, cfg: ImageConfig, structure: bool = True):
    """Open (lazily) with Pillow after the size limits and, for PNG/JPEG, the structural checks."""
    from PIL import Image

    check_limits(cfg, len(data))
    kind = sniff(data)
    if structure and kind == "PNG":
        check_limits(cfg, len(data), *check_png(data))
    elif structure and kind == "JPEG":
        w, h, _ = check_jpeg(data)
        check_limits(cfg, len(data), w, h)
    try:
        im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image file (formats tried: {', '.join(DECODE_FORMATS)}; first bytes "
                         f"{bytes(data[:8])!r}{_looks_like(data)})") from None
    check_limits(cfg, len(data), *im.size)
    return im


def verify_decodes(data: bytes, cfg: ImageConfig, kind: str) -> None:
    """Full pixel decode with Pillow (the ``verify: decode`` passthrough check; structure already checked)."""
    im = open_image(data, cfg, structure=False)
    try:
        im.load()
    except Exception as e:
        raise ImageError(f"{kind} does not decode: {type(e).__name__}: {e}") from None


def load_pixels(data: bytes, cfg: ProcessConfig):
    """File bytes -> processed PIL image (RGB or L): drop alpha -> crop + resize -> mode.

    Crop and resize are one Pillow ``resize(size, box=crop)`` (the filter sees the pixels just outside the
    crop, so its edges are not clamped); without ``size`` the crop is a plain crop. Alpha is composited on
    ``background`` unless every pixel inside the crop is opaque, in which case it is dropped as is.

    Decoders: 8-bit non-palette PNGs are decoded with libspng (``pyspng``) when it is installed, which is
    about 1.4x faster than Pillow; PNG decoding is lossless and both paths apply the same Pillow operations
    in the same order, so they give identical pixels (a test checks). Everything else goes through Pillow.
    JPEG inputs use ``Image.draft`` (DCT scaling at 1/2, 1/4 or 1/8) when the target is at most half the
    crop in both directions: faster, deterministic for a given libjpeg, the crop box scaled to match.
    """
    from PIL import Image

    check_limits(cfg, len(data))
    spng = _pyspng()
    if spng is not None and sniff(data) == "PNG":
        w, h = check_png(data)
        check_limits(cfg, len(data), w, h)
        if data[24] == 8 and data[25] in (0, 2, 4, 6):  # bit depth 8; gray, RGB, gray+alpha, RGBA
            try:
                arr = spng.load(data)
            except Exception as e:
                raise ImageError(f"cannot decode PNG: {e}") from None
            box = crop_box(cfg, w, h)
            if arr.ndim == 3 and arr.shape[2] == 4 and arr[box[1]:box[3], box[0]:box[2], 3].min() == 255:
                # opaque RGBA: Pillow stores RGB as RGBX, so the decoded buffer is mapped without a copy
                im = Image.frombuffer("RGBX", (w, h), arr, "raw", "RGBX", 0, 1)
            else:
                mode = "L" if arr.ndim == 2 else ("L", "LA", "RGB", "RGBA")[arr.shape[2] - 1]
                im = drop_alpha(Image.frombuffer(mode, (w, h), arr, "raw", mode, 0, 1), cfg.background, box)
            return _finish(im, box, cfg)
    im = open_image(data, cfg)
    W, H = im.size
    box = crop_box(cfg, W, H)
    if im.format == "JPEG" and cfg.size is not None:
        bw, bh = box[2] - box[0], box[3] - box[1]
        if min(bw // cfg.size[0], bh // cfg.size[1]) >= 2:
            im.draft(None, (W * cfg.size[0] // bw, H * cfg.size[1] // bh))
            if im.size != (W, H):  # the crop box follows the reduced scale
                sx, sy = im.size[0] / W, im.size[1] / H
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image: {e}") from None
    ibox = tuple(int(round(v)) for v in box)
    return _finish(drop_alpha(im, cfg.background, ibox), box, cfg)


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


_STRATEGY = {"default": zlib.Z_DEFAULT_STRATEGY, "filtered": zlib.Z_FILTERED, "rle": zlib.Z_RLE,
             "huffman": zlib.Z_HUFFMAN_ONLY}


def encode_png(im, compress_level: int = 6, filter: str = "adaptive", strategy: str = "filtered") -> bytes:
    """A minimal, deterministic PNG writer: ``IHDR, IDAT, IEND`` only, 8-bit gray or RGB, non-interlaced.

    ``filter``: one PNG filter for every row (none, sub, up, average, paeth) or ``adaptive``: per row the
    filter with the smallest sum of absolute signed residuals (libpng's heuristic), computed with numpy.
    ``strategy`` is zlib's (``filtered`` is what libpng uses for filtered rows; ``rle`` compresses about 10x
    faster for a few percent more bytes). The bytes depend only on the pixels, these options and zlib, so
    ``len = 8 + 25 + (12 + len(zlib stream)) + 12``.
    """
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    H, W, C = arr.shape
    x = arr.reshape(H, W * C).astype(np.int16)
    # neighbours in the previous row (up), previous pixel (left) and both (upleft), 0 outside the image
    pad = np.zeros((H + 1, W * C + C), dtype=np.int16)
    pad[1:, C:] = x
    up, left, upleft = pad[:-1, C:], pad[1:, :-C], pad[:-1, :-C]
    if filter == "adaptive":
        names = ("none", "sub", "up", "average", "paeth")
    elif filter in _FILTER_CODE:
        names = (filter,)
    else:
        raise ValueError(f"unknown PNG filter {filter!r}")
    preds = []
    for name in names:
        if name == "none":
            preds.append(np.zeros_like(x))
        elif name == "sub":
            preds.append(left)
        elif name == "up":
            preds.append(up)
        elif name == "average":
            preds.append((left + up) >> 1)
        else:  # paeth
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            preds.append(np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft)))
    res = ((x[None] - np.stack(preds)) & 0xFF).astype(np.uint8)  # (filters, H, W*C)
    if len(names) == 1:
        best = np.zeros(H, dtype=np.intp)
    else:  # libpng's heuristic: smallest sum of |residual| read as signed bytes; first filter wins ties
        best = np.abs(res.view(np.int8).astype(np.int16)).sum(axis=2).argmin(axis=0)
    body = res[best, np.arange(H)]
    code = np.asarray([_FILTER_CODE[n] for n in names], dtype=np.uint8)[best]
    raw = np.concatenate([code[:, None], body], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", W, H, 8, 0 if C == 1 else 2, 0, 0, 0)
    z = zlib.compressobj(compress_level, zlib.DEFLATED, 15, 8, _STRATEGY[strategy])
    idat = z.compress(raw) + z.flush()
    return b"".join((PNG_SIGNATURE, _chunk(b"IHDR", ihdr), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


_FILTER_CODE = {"none": 0, "sub": 1, "up": 2, "average": 3, "paeth": 4}


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


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


def drop_alpha(im, background: tuple[int, int, int], box: tuple[int, int, int, int] | None = None):
    """Remove transparency: alpha that is fully opaque inside ``box`` (default: everywhere) is dropped as
    is, anything else is composited on ``background``. Returns an image of mode RGB, RGBX or L."""
    from PIL import Image

    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ImageError(f"unsupported image mode {im.mode} (high bit depth); convert to 8-bit first")
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
