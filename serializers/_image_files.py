"""Image file containers: structural checks without pixel decoding, and a strict Pillow decode.

* :func:`check_png` walks the PNG chunks (signature, IHDR first, IDAT, IEND last and nothing after it),
  optionally verifying every CRC (the decode paths do).
* :func:`check_jpeg` walks the JPEG segments: SOI, well-formed segments, a frame header (SOF) before the
  first scan, EOI at the end. With ``scans=True`` (the decode paths, ``verify: decode``) it goes on through
  every scan's entropy-coded data to the first EOI and refuses a scan with fewer restart markers than its
  restart interval needs (cut inside the scan), scans that stop before every component is complete (a
  progressive file short of full precision for some coefficient: cut at a scan boundary), and any byte
  after EOI (a camera trailer, an MPO's second image, junk), as PNG refuses bytes after IEND. A file
  without EOI is refused as truncated at every level.
* :func:`load_strict` decodes a PNG or JPEG that Pillow opened and refuses pixel data that stops before the
  image is complete, whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says (it drives Pillow's decoder itself).

JPEG completeness: libjpeg fills a scan that meets a marker too early with zero coefficients (grey) and
only *warns* ("premature end of data segment"); Pillow drops the warning, so a file cut mid-scan with an
EOI appended used to decode "fine". :func:`load_strict` feeds libjpeg the file *without* its EOI, then
seven ``ff 00`` pairs (0xff data bytes: libjpeg's bit reader reads up to 57 bits ahead of the last code it
decodes), then a one-byte probe, then EOI: a complete image finishes (with several scans libjpeg instead
waits for the marker after the last and swallows the probe), an incomplete one stops inside a scan waiting
for data, which is an error. The image is decoded once, exactly as from the original file. The padding
can stand in for at most a few dozen missing bits at the very end of a scan or restart interval (all-ones
bits are no valid Huffman code; libjpeg reads each as end-of-block after 17 bits), so at most the last one
or two 8x8 blocks of a scan or interval may come from it; every other cut is refused.
"""

from __future__ import annotations

import re
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(ValueError):
    """Internal: why an image was refused (turned into a SerializationError naming the sample)."""


def sniff(data: bytes) -> str:
    """'PNG', 'JPEG' or '' from the first bytes."""
    if data[:8] == PNG_SIGNATURE:
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    return ""


def looks_like(data: bytes) -> str:
    head = bytes(data[:16])
    for sig, name in ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "RIFF/WEBP"), (b"\xff\xd8", "JPEG"),
                      (PNG_SIGNATURE, "PNG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")):
        if head.startswith(sig):
            return f"; looks like {name}"
    if not head:
        return "; empty"
    return ""


# ----------------------------------------------------------------------------------------------
# PNG


def check_png(data: bytes, crc: bool = False) -> tuple[int, int]:
    """Walk the PNG chunks: signature, IHDR first, at least one IDAT, IEND last and nothing after it.

    Returns (width, height) from IHDR. ``crc=True`` also verifies every chunk's CRC-32 (the decode paths
    do: libspng is run with CRC checks off and Pillow checks only some chunks, so this is what makes both
    refuse the same corrupt files). Raises ImageError.
    """
    n = len(data)
    if data[:8] != PNG_SIGNATURE:
        raise ImageError(f"not a PNG file (first bytes {bytes(data[:8])!r}{looks_like(data)})")
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


def png_image_data(data: bytes) -> bytes:
    """The zlib stream of a checked PNG: the payloads of its IDAT chunks, concatenated."""
    pos, parts = 8, []
    while pos + 12 <= len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if ctype == b"IDAT":
            parts.append(data[pos + 8:pos + 8 + length])
        elif parts:  # the IDAT chunks of a PNG are consecutive
            break
        pos += 12 + length
    return parts[0] if len(parts) == 1 else b"".join(parts)


# ----------------------------------------------------------------------------------------------
# JPEG

_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
#: the marker that ends a scan's entropy-coded data: 0xff followed by neither a stuffed 0x00, nor a
#: restart marker (0xd0-0xd7, part of the scan), nor another 0xff (fill byte)
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_RST = re.compile(rb"\xff[\xd0-\xd7]")


def _marker_at(data: bytes, pos: int, truncated: str) -> tuple[int, int]:
    """(position, code) of the JPEG marker at ``pos``, after any 0xff fill bytes; ``truncated`` (formatted with
    ``pos`` and ``n``) is the error when the file ends first."""
    n = len(data)
    while True:
        if pos + 2 > n:
            raise ImageError(truncated.format(pos=pos, n=n))
        if data[pos] != 0xFF:
            raise ImageError(f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        if data[pos + 1] != 0xFF:
            return pos, data[pos + 1]
        pos += 1  # a fill byte


def _segment_length(data: bytes, pos: int, marker: int) -> int:
    """The length field of the segment whose marker is at ``pos``, checked against the file's end."""
    n = len(data)
    if pos + 4 > n:
        raise ImageError(f"truncated JPEG: segment header at byte {pos}")
    (length,) = struct.unpack_from(">H", data, pos + 2)
    if length < 2 or pos + 2 + length > n:
        raise ImageError(f"{'truncated' if length >= 2 else 'corrupt'} JPEG: segment 0xff{marker:02x} at "
                         f"byte {pos} has length {length}, {n - pos - 2} bytes left")
    return length


def check_jpeg(data: bytes, scans: bool = True) -> tuple[int, int, bool]:
    """Walk the JPEG segments (no pixel decoding). Returns (width, height, progressive); raises ImageError.

    ``scans=False`` (cheap, the passthrough ``verify: structure`` level): SOI, well-formed segments, a frame
    header before the first scan, and EOI as the last two bytes. ``scans=True`` goes on through every scan
    to the first EOI (see the module docstring): restart markers, every component complete (progressive:
    every coefficient to full precision), nothing after EOI.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise ImageError(f"not a JPEG file (first bytes {bytes(data[:8])!r}{looks_like(data)})")
    pos = 2
    size = sof = None
    progressive = False
    restart = 0
    while True:
        pos, marker = _marker_at(data, pos, "truncated JPEG: no start of scan (ended at byte {pos})")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0x00):
            raise ImageError(f"corrupt JPEG: unexpected marker 0xff{marker:02x} at byte {pos} before the scan")
        length = _segment_length(data, pos, marker)
        if marker in _SOF:
            if length < 8:
                raise ImageError(f"corrupt JPEG: frame header of length {length}")
            height, width = struct.unpack_from(">HH", data, pos + 5)
            if width == 0 or height == 0:
                raise ImageError(f"unsupported JPEG: frame size {width}x{height} (DNL height is not supported)")
            size, sof = (width, height), pos
            progressive = marker in _PROGRESSIVE
        elif marker == 0xDD and length == 4:  # DRI: the restart interval
            (restart,) = struct.unpack_from(">H", data, pos + 4)
        elif marker == 0xDA:
            if size is None:
                raise ImageError("corrupt JPEG: start of scan before any frame header (SOF)")
            if scans:
                _walk_scans(data, pos, sof, progressive, restart)
            elif n - (pos + 2 + length) < 2 or data[-2:] != b"\xff\xd9":
                raise ImageError("truncated JPEG: the file does not end with EOI (0xffd9)")
            return size[0], size[1], progressive
        pos += 2 + length


def _walk_scans(data: bytes, pos: int, sof: int, progressive: bool, restart: int) -> None:
    """From the first SOS at ``pos`` to EOI: every scan's data, restart markers, completeness, the end."""
    n = len(data)
    height, width = struct.unpack_from(">HH", data, sof + 5)
    nc = data[sof + 9]
    if nc == 0 or struct.unpack_from(">H", data, sof + 2)[0] != 8 + 3 * nc:
        raise ImageError(f"corrupt JPEG: frame header at byte {sof} for {nc} components has the wrong length")
    comps = {data[p]: (data[p + 1] >> 4, data[p + 1] & 15) for p in range(sof + 10, sof + 10 + 3 * nc, 3)}
    if min(min(hv) for hv in comps.values()) < 1 or max(max(hv) for hv in comps.values()) > 4:
        raise ImageError(f"corrupt JPEG: sampling factors {sorted(comps.values())} out of range 1..4")
    frame = (width, height, comps)
    precision: dict[int, bytearray] = {}  # progressive: component id -> each coefficient's last Al (0xff: none)
    seen: set[int] = set()  # sequential: the components scanned
    scans = 0
    while True:
        pos, marker = _marker_at(data, pos, "truncated JPEG: no EOI marker (0xffd9); the file ends at byte {n}")
        if marker == 0xD9:
            short = [c for c in comps if (precision.get(c, b"").count(0) != 64 if progressive else c not in seen)]
            if short:
                raise ImageError(f"truncated JPEG: the scans end before component(s) {short} are complete "
                                 f"({'coefficients short of full precision' if progressive else 'no scan'}); "
                                 f"was the file cut at a scan boundary and an EOI appended?")
            if pos + 2 != n:
                raise ImageError(f"JPEG has {n - pos - 2} bytes after the EOI marker at byte {pos} (appended "
                                 f"data, e.g. a camera trailer or a second image); strip them first")
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # parameterless (a stray RSTn is ignored, as libjpeg does)
            pos += 2
            continue
        if marker in (0xD8, 0x00) or marker in _SOF:
            raise ImageError(f"corrupt JPEG: unexpected marker 0xff{marker:02x} at byte {pos} after the first scan")
        length = _segment_length(data, pos, marker)
        if marker == 0xDD and length == 4:  # DRI between scans
            (restart,) = struct.unpack_from(">H", data, pos + 4)
        elif marker == 0xDC:
            raise ImageError("unsupported JPEG: DNL marker (height defined after the first scan)")
        elif marker == 0xDA:
            ns = data[pos + 4]
            if length != 6 + 2 * ns or ns == 0:
                raise ImageError(f"corrupt JPEG: scan header of length {length} for {ns} components")
            ids = data[pos + 5:pos + 5 + 2 * ns:2]
            if not comps.keys() >= set(ids):
                raise ImageError(f"corrupt JPEG: scan {scans + 1} names components {sorted(set(ids) - comps.keys())}"
                                 f", not in the frame")
            if progressive:
                ss, se, al = data[pos + 5 + 2 * ns], data[pos + 6 + 2 * ns], data[pos + 7 + 2 * ns] & 15
                if ss <= se <= 63:
                    for c in ids:
                        precision.setdefault(c, bytearray(b"\xff" * 64))[ss:se + 1] = bytes((al,)) * (se - ss + 1)
            else:
                seen.update(ids)
            start = pos + 2 + length
            m = _END_OF_SCAN.search(data, start)
            if m is None:
                raise ImageError(f"truncated JPEG: the data of scan {scans + 1} (from byte {start}) runs to the "
                                 f"end of the file; no EOI marker (0xffd9)")
            if restart:
                expected = _cdiv(_scan_mcus(frame, ids), restart) - 1
                found = len(_RST.findall(data, start, m.start()))
                if found < expected:
                    raise ImageError(f"truncated JPEG: scan {scans + 1} holds {found} of its {expected} restart "
                                     f"markers (the file was cut inside the scan)")
            scans += 1
            pos = m.start()
            continue
        pos += 2 + length


def _scan_mcus(frame, ids: bytes) -> int:
    """MCUs in a scan over the components ``ids`` (one block each when the scan has one component)."""
    width, height, comps = frame
    hmax = max(h for h, _ in comps.values())
    vmax = max(v for _, v in comps.values())
    if len(ids) == 1 and ids[0] in comps:
        h, v = comps[ids[0]]
        return _cdiv(_cdiv(width * h, hmax), 8) * _cdiv(_cdiv(height * v, vmax), 8)
    return _cdiv(width, 8 * hmax) * _cdiv(height, 8 * vmax)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# strict decoding

PNG_TRUNCATED = "truncated PNG: the image data (IDAT) ends before the last row"
_JPEG_PAD = b"\xff\x00" * 7  # seven 0xff data bytes (stuffed): covers libjpeg's 57-bit read-ahead
_CODEC_ERRORS = {-1: "image buffer overrun", -2: "broken data stream", -3: "unknown error",
                 -8: "bad configuration", -9: "out of memory"}


def load_strict(im, data: bytes) -> None:
    """Decode ``im`` (opened by Pillow from the checked PNG or JPEG file ``data``, a JPEG possibly after
    ``draft``) and raise ImageError if its pixel data stops before the image is complete.

    Does what ``ImageFile.load`` does for a one-tile image (the same decoder on the same bytes), but a
    decoder that still wants data is an error even when ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set.
    """
    from PIL import Image

    fmt = im.format
    if len(im.tile) != 1:
        raise ImageError(f"unsupported {fmt}: {len(im.tile)} tiles")
    name, extents, offset, args = im.tile[0]
    im.load_prepare()
    decoder = Image._getdecoder(im.mode, name, args, im.decoderconfig)
    try:
        decoder.setimage(im.im, extents)
        if fmt == "PNG":
            # the zlib stream's last 4 bytes (its Adler-32) go last and only if the rows need them: libspng
            # does not check the Adler-32 either (the chunk CRCs cover the same bytes)
            z = png_image_data(data)
            n, err = decoder.decode(z[:-4])
            if n >= 0 and err >= 0:
                n, err = decoder.decode(z[n:])
            if n >= 0 and err >= 0:
                raise ImageError(PNG_TRUNCATED)
        else:
            body = data[offset:-2] + _JPEG_PAD  # without EOI: libjpeg waits for data instead of filling grey
            n, err = decoder.decode(body)
            if n >= 0:  # not finished: several scans (libjpeg waits for the marker after the last), or cut
                if n == len(body):
                    n, err = decoder.decode(b"\xff\x00")  # taken whole only where no scan wants more bits
                    if n == 2:
                        n, err = decoder.decode(b"\xff\xd9")
                if n >= 0:
                    raise ImageError("truncated JPEG: the entropy-coded data stops before the image is complete "
                                     "(libjpeg would fill the rest with grey); was the file cut and an EOI "
                                     "marker appended?")
        if err < 0:
            raise ImageError(f"{fmt} does not decode: {_CODEC_ERRORS.get(err, f'decoder error {err}')}")
    finally:
        decoder.cleanup()
    im.tile = []
    im.readonly = 0
    im.fp = None
    Image.Image.load(im)  # applies a palette, as ImageFile.load does last
