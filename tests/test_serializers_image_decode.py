"""Decoding rules of the image serializers: every PNG colour type and bit depth reads the same with libspng
and with Pillow, 16-bit samples keep their high byte, and incomplete files (a JPEG cut mid-scan with an EOI
appended, a PNG whose image data stops early) are refused in every decoding serializer, whatever
``ImageFile.LOAD_TRUNCATED_IMAGES`` says.

Files are written here: PNGs by a minimal writer (any colour type, depth, interlace, chunking, extra
chunks), JPEGs by Pillow from the shipped real CLEVR render ``omnibyte/examples/clevr_sample.png``.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import omnibyte.serializers._image as imgmod
from omnibyte.errors import SerializationError
from omnibyte.registry import SERIALIZERS
from omnibyte.serializers._image_files import check_jpeg

CLEVR_SAMPLE = Path(__file__).parents[1] / "omnibyte" / "examples" / "clevr_sample.png"

# ----------------------------------------------------------------------------------------------
# a minimal PNG writer

ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
VALID = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8),
         (4, 8), (4, 16), (6, 8), (6, 16)]  # every (colour type, bit depth) the PNG spec allows


def chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def scanlines(img: np.ndarray, depth: int, filt: int = 0) -> bytes:
    """Rows of ``img`` (H, W[, C]) of raw sample values packed at ``depth`` bits, each with filter byte
    ``filt`` (0 none or 1 sub; sub is applied here)."""
    H = img.shape[0]
    flat = img.reshape(H, -1).astype(np.uint32)
    if depth == 16:
        body = flat.astype(">u2").view(np.uint8).reshape(H, -1)
    elif depth == 8:
        body = flat.astype(np.uint8)
    else:
        per = 8 // depth
        n = flat.shape[1]
        v = np.zeros((H, -(-n // per) * per), np.uint32)
        v[:, :n] = flat
        body = (v.reshape(H, -1, per) << (np.arange(per - 1, -1, -1) * depth)).sum(-1).astype(np.uint8)
    if filt == 1:  # sub: byte minus the byte one pixel to the left
        bpp = max(1, depth * (img.shape[2] if img.ndim == 3 else 1) // 8)
        left = np.zeros_like(body)
        left[:, bpp:] = body[:, :-bpp]
        body = (body.astype(np.int16) - left) & 0xFF
    return np.concatenate([np.full((H, 1), filt, np.uint8), body.astype(np.uint8)], 1).tobytes()


def png_file(samples: np.ndarray, ct: int, depth: int, palette=None, trns: bytes | None = None,
             interlace: bool = False, idats: int = 1, before=(), after=(), filt: int = 0) -> bytes:
    H, W = samples.shape[:2]
    if interlace:
        raw = b"".join(scanlines(samples[y0::dy, x0::dx], depth, filt) for x0, y0, dx, dy in ADAM7
                       if samples[y0::dy, x0::dx].size)
    else:
        raw = scanlines(samples, depth, filt)
    z = zlib.compress(raw, 9)
    step = -(-len(z) // idats)
    out = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, depth, ct, 0, 0, int(interlace)))]
    out += [chunk(t, p) for t, p in before]
    if palette is not None:
        out.append(chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes()))
    if trns is not None:
        out.append(chunk(b"tRNS", trns))
    out += [chunk(b"IDAT", z[i:i + step]) for i in range(0, len(z), step)]
    out += [chunk(t, p) for t, p in after]
    return b"".join(out) + chunk(b"IEND", b"")


def to8(v: np.ndarray, depth: int) -> np.ndarray:
    """The documented rule: 16-bit samples keep their high byte, 1/2/4-bit grey is scaled to 0..255."""
    v = v.astype(np.uint32)
    if depth == 16:
        return (v >> 8).astype(np.uint8)
    return (v * (255 // ((1 << depth) - 1))).astype(np.uint8)


def case(ct: int, depth: int, seed: int, opaque: bool, h: int = 13, w: int = 21):
    """(kwargs for png_file, the same image as an 8-bit reference PNG, its expected RGB when opaque)."""
    rng = np.random.default_rng(seed)
    top = (1 << depth) - 1
    if ct == 3:
        n = 1 << depth
        idx = rng.integers(0, n, (h, w))
        pal = rng.integers(0, 256, (n, 3), dtype=np.uint8)
        kw = dict(samples=idx, ct=3, depth=depth, palette=pal)
        rgb = pal[idx]
        if opaque:
            return kw, png_file(rgb, 2, 8), rgb
        alpha = rng.integers(0, 256, n, dtype=np.uint8)
        alpha[0] = 255
        kw["trns"] = alpha.tobytes()
        return kw, png_file(np.concatenate([rgb, alpha[idx][..., None]], -1), 6, 8), None
    samples = rng.integers(0, top + 1, (h, w, CHANNELS[ct]), dtype=np.uint32)
    samples[0, 0] = 0
    samples[-1, -1] = top  # both extremes occur
    if ct in (4, 6) and opaque:
        samples[..., -1] = top
    kw = dict(samples=samples, ct=ct, depth=depth)
    ref8 = to8(samples, 8 if depth == 8 else depth) if depth != 8 else samples.astype(np.uint8)
    ref_ct = {0: 0, 2: 2, 4: 4, 6: 6}[ct]
    ref = png_file(ref8, ref_ct, 8)
    if ct in (4, 6) and not opaque:
        return kw, ref, None
    colour = ref8[..., :3] if ct in (2, 6) else np.repeat(ref8[..., :1], 3, -1)
    return kw, ref, colour


def decoders(monkeypatch):
    """Yields 'spng' and 'pillow' with that decoder in force (the spng one counting its calls)."""
    spng = pytest.importorskip("pyspng")

    class Counting:
        calls = 0

        def load(self, data):
            Counting.calls += 1
            return spng.load(data)

    counting = Counting()
    for name in ("spng", "pillow"):
        monkeypatch.setattr(imgmod, "_SPNG", counting if name == "spng" else None)
        yield name, counting


def stream(node: dict, data: bytes, sid: str = "s") -> bytes:
    """The stream's tokens (uint16, specials included) as bytes: for comparing whole streams."""
    return SERIALIZERS.build(node)({"id": sid, "image": data}).tokens.tobytes()


def payload(node: dict, data: bytes) -> bytes:
    """The stream's image bytes (one byte per token)."""
    return SERIALIZERS.build(node)({"id": "s", "image": data}).data_bytes()


NODES = [dict(name="pixels"), dict(name="pixels", mode="L", crop=0.2, size=[9, 6], background=[10, 200, 30]),
         dict(name="png", method="reencode"), dict(name="png", method="reencode", size=[31, 17], mode="L")]


# ----------------------------------------------------------------------------------------------
# PNG: every colour type and depth, both decoders


@pytest.mark.parametrize("ct,depth", VALID)
@pytest.mark.parametrize("interlace", [False, True])
def test_every_png_colour_type_and_depth_same_with_both_decoders(ct, depth, interlace, monkeypatch):
    for opaque in (True, False):
        kw, ref, colour = case(ct, depth, seed=ct * 100 + depth, opaque=opaque)
        data = png_file(**kw, interlace=interlace, idats=3, filt=depth % 2)
        out = {}
        for name, counting in decoders(monkeypatch):
            before = counting.calls
            out[name] = [stream(node, data) for node in NODES]
            if name == "spng":  # libspng takes exactly the 8-bit grey, RGB and RGBA files
                assert (counting.calls > before) == (depth == 8 and ct in (0, 2, 6)), (ct, depth)
            assert out[name] == [stream(node, ref) for node in NODES], (name, ct, depth, opaque)
            if colour is not None:  # the documented rule, pixel for pixel
                assert payload(dict(name="pixels"), data) == colour.tobytes()
        assert out["spng"] == out["pillow"]


def test_grey_alpha_png_accepted_with_both_decoders(monkeypatch):
    """The issue: colour type 4 (8-bit grey+alpha) was refused with pyspng and accepted without it."""
    la = np.zeros((6, 8, 2), np.uint8)
    la[..., 0] = np.arange(8) * 30
    la[..., 1] = 255
    la[:3, :, 1] = 0  # top half transparent
    buf = io.BytesIO()
    Image.fromarray(la, "LA").save(buf, "PNG")
    data = buf.getvalue()
    assert data[25] == 4 and data[24] == 8
    outs = []
    for _name, _ in decoders(monkeypatch):
        ser = SERIALIZERS.build(dict(name="pixels", mode="L", background=[50, 50, 50], header=True))
        px = np.asarray(ser.decode(ser({"id": "la", "image": data})))
        assert (px[:3] == 50).all() and (px[3:] == la[3:, :, 0]).all()
        outs.append([stream(node, data) for node in NODES])
    assert outs[0] == outs[1]


def test_sixteen_bit_keeps_the_high_byte_everywhere(monkeypatch):
    """16-bit grey, grey+alpha, RGB and RGBA: v >> 8 (not round(v / 257)) in pixels, re-encodes and
    pixels' bit reduction, with either decoder."""
    v = np.array([0, 255, 256, 0x01FF, 0x7F80, 0x80FF, 0xFEFF, 0xFFFF], np.uint32)  # 0x01FF: >>8 = 1, /257 = 2
    grey = np.tile(v, (3, 1))
    for ct in (0, 4, 2, 6):
        c = CHANNELS[ct]
        s = np.repeat(grey[..., None], c, -1)
        if ct in (4, 6):
            s[..., -1] = 0xFFFF
        data = png_file(s, ct, 16)
        for _name, _ in decoders(monkeypatch):
            assert payload(dict(name="pixels", mode="L"), data) == (grey >> 8).astype(np.uint8).tobytes()
            assert payload(dict(name="pixels", mode="L", bits=3), data) == (grey >> 13).astype(np.uint8).tobytes()
            back = SERIALIZERS.build(dict(name="png", method="reencode"))
            out = back.decode(back({"id": "r", "image": data}))
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(out)).convert("L")), grey >> 8)
    assert list(grey[0] >> 8) != [round(x / 257) for x in grey[0]]  # the two rules really differ here


def test_trns_colour_key_ignored_and_palette_alpha_composited_with_both_decoders(monkeypatch):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    key = rgb[0, 0]
    files = {
        "rgb8": (png_file(rgb, 2, 8, trns=struct.pack(">HHH", *key)), png_file(rgb, 2, 8)),
        "grey8": (png_file(rgb[..., :1], 0, 8, trns=struct.pack(">H", rgb[0, 0, 0])), png_file(rgb[..., :1], 0, 8)),
        "grey16": (png_file(rgb[..., :1].astype(np.uint32) << 8, 0, 16, trns=struct.pack(">H", rgb[0, 0, 0] << 8)),
                   png_file(rgb[..., :1], 0, 8)),
    }
    for name, (data, ref) in files.items():
        outs = []
        for _dec, _ in decoders(monkeypatch):
            outs.append([stream(node, data) for node in NODES])
            assert outs[-1] == [stream(node, ref) for node in NODES], name  # the key is not transparency
        assert outs[0] == outs[1]


def corrupt_pngs() -> dict[str, bytes]:
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    raw = scanlines(img, 8)
    z = zlib.compress(raw)

    def with_z(zz: bytes) -> bytes:
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30, 20, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zz) + chunk(b"IEND", b""))

    good = png_file(img, 2, 8, idats=2)
    flipped = bytearray(good)
    flipped[good.index(b"IDAT") + 20] ^= 0x10  # inside the image data: only the IDAT CRC can tell
    return {
        "good": good,
        "idat-bit-flip": bytes(flipped),
        "text-crc-before": png_file(img, 2, 8, before=[(b"tEXt", b"k\x00v")]).replace(b"k\x00v", b"k\x00w"),
        "text-crc-after": png_file(img, 2, 8, after=[(b"tEXt", b"k\x00v")]).replace(b"k\x00v", b"k\x00w"),
        "zlib-cut-in-half": with_z(z[:len(z) // 2]),
        "rows-missing": with_z(zlib.compress(raw[:-10])),
        "no-adler32": with_z(z[:-4]),
        "bad-adler32": with_z(z[:-1] + bytes([z[-1] ^ 1])),
        "zlib-then-junk": with_z(z + b"junkjunk"),
        "extra-rows": with_z(zlib.compress(raw + bytes(91))),
    }


@pytest.mark.parametrize("lti", [False, True])
def test_corrupt_pngs_same_verdict_with_both_decoders(lti, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lti)
    refused = {"idat-bit-flip": "CRC mismatch in chunk b'IDAT'", "text-crc-before": "CRC mismatch in chunk b'tEXt'",
               "text-crc-after": "CRC mismatch in chunk b'tEXt'",
               "zlib-cut-in-half": "truncated PNG: the image data", "rows-missing": "truncated PNG: the image data"}
    for name, data in corrupt_pngs().items():
        verdicts = []
        for dec, _ in decoders(monkeypatch):
            for node in (*NODES, dict(name="png", verify="decode"), dict(name="qa", image=dict(name="pixels"))):
                sample = {"id": f"{name}-{dec}", "image": data, "question": "q?", "answer": "a"}
                try:
                    SERIALIZERS.build(node)(sample)
                    verdicts.append("ok")
                except SerializationError as e:
                    assert f"sample '{name}-{dec}'" in str(e)
                    assert name in refused and refused[name] in str(e), (name, dec, node, str(e))
                    verdicts.append(str(e).split("]: ", 1)[1])
        if name not in refused:
            assert set(verdicts) == {"ok"}, (name, verdicts)
        assert len(set(verdicts)) == 1, (name, verdicts)  # one verdict, one message, whichever decoder


# ----------------------------------------------------------------------------------------------
# JPEG: complete or refused


def clevr_jpeg(**save) -> bytes:
    buf = io.BytesIO()
    Image.open(CLEVR_SAMPLE).convert("RGB").save(buf, "JPEG", **save)
    return buf.getvalue()


JPEGS = {
    "baseline": dict(quality=90),
    "progressive": dict(quality=90, progressive=True),
    "restart": dict(quality=75, restart_marker_blocks=4),
    "444-optimized": dict(quality=95, subsampling=0, optimize=True),
}
DECODING = [dict(name="jpeg", verify="decode"), dict(name="jpeg", method="reencode"),
            dict(name="png", method="reencode"), dict(name="pixels"), dict(name="pixels", size=[40, 30]),
            dict(name="qa", image=dict(name="jpeg", verify="decode")),
            dict(name="qa", image=dict(name="pixels", size=[62, 41], crop=0.1))]


@pytest.mark.parametrize("kind", list(JPEGS))
def test_complete_jpegs_decode_as_pillow_does(kind, monkeypatch):
    """The strict decode gives exactly Pillow's own pixels (full size and DCT-scaled by draft)."""
    data = clevr_jpeg(**JPEGS[kind])
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert payload(dict(name="pixels"), data) == ref.tobytes()
    assert payload(dict(name="jpeg", verify="decode"), data) == data
    nodes = [dict(name="pixels", size=[40, 30]), dict(name="pixels", size=[62, 41], crop=0.1, mode="L"),
             dict(name="jpeg", method="reencode", size=[80, 60]), dict(name="png", method="reencode")]
    strict = [stream(node, data) for node in nodes]
    monkeypatch.setattr(imgmod, "load_strict", lambda im, data: im.load())  # Pillow's plain ImageFile.load
    assert strict == [stream(node, data) for node in nodes]


@pytest.mark.parametrize("lti", [False, True])
def test_jpeg_cut_mid_scan_with_eoi_appended_is_refused(lti, monkeypatch):
    """The issue: a real JPEG cut halfway through its scan, EOI appended, decoded with a grey bottom half."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lti)
    data = clevr_jpeg(quality=90)
    sos = data.index(b"\xff\xda")
    cut = data[:sos + (len(data) - sos) // 2] + b"\xff\xd9"
    grey = np.asarray(Image.open(io.BytesIO(cut)).convert("RGB"))  # what Pillow alone makes of it
    assert (grey[-8:] == grey[-1, -1]).all()  # a flat grey fill at the bottom: the silent failure
    for node in DECODING:
        with pytest.raises(SerializationError, match=r"sample 'cut' \[\w+\]: truncated JPEG: the entropy-coded data "
                                                     r"stops before the image is complete"):
            SERIALIZERS.build(node)({"id": "cut", "image": cut, "question": "q?", "answer": "a"})
    assert payload(dict(name="jpeg"), cut) == cut  # verify: structure reads no scan data (documented)


@pytest.mark.parametrize("kind", list(JPEGS))
def test_every_cut_of_a_real_jpeg_is_refused(kind):
    data = clevr_jpeg(**JPEGS[kind])
    first = data.index(b"\xff\xda")
    ser = SERIALIZERS.build(dict(name="pixels"))
    cuts = [*range(1, 48), *range(48, len(data) - first - 24, 53)]  # scan bytes removed before the EOI
    for missing in cuts:
        bad = data[:len(data) - 2 - missing] + b"\xff\xd9"
        with pytest.raises(SerializationError, match=rf"sample 'm{missing}' \[pixels\]: truncated JPEG"):
            ser({"id": f"m{missing}", "image": bad})


def test_jpeg_structure_refusals_in_decode_paths():
    data = clevr_jpeg(quality=75, restart_marker_blocks=4)
    prog = clevr_jpeg(quality=90, progressive=True)
    sos = data.index(b"\xff\xda")
    scans = [i for i in range(len(prog) - 1) if prog[i:i + 2] == b"\xff\xda"]
    cases = {
        "trailing-junk": (data + b"junk", r"4 bytes after the EOI marker"),
        "two-images": (data + data, rf"{len(data)} bytes after the EOI marker"),
        "no-eoi": (data[:-2], r"truncated JPEG: .*no EOI marker"),
        "restart-interval-lost": (data[:sos + 300] + b"\xff\xd9", r"restart markers"),
        "progressive-scan-boundary": (prog[:scans[-2]] + b"\xff\xd9", r"short of full precision"),
    }
    assert len(scans) > 3
    for name, (bad, pattern) in cases.items():
        for node in DECODING:
            with pytest.raises(SerializationError, match=rf"sample '{name}' \[\w+\]: .*{pattern}"):
                SERIALIZERS.build(node)({"id": name, "image": bad, "question": "q?", "answer": "a"})
    # verify: structure stays the cheap check: EOI as the last two bytes, no scan walked
    structure = SERIALIZERS.build(dict(name="jpeg"))
    for name in ("trailing-junk", "no-eoi"):
        with pytest.raises(SerializationError, match="does not end with EOI"):
            structure({"id": name, "image": cases[name][0]})
    assert structure({"id": "2", "image": data + data}).tokens.shape[0] == 2 * len(data)


def test_check_jpeg_restart_and_scan_counts_on_every_layout():
    """The scan walk knows the MCU count of every sampling layout (no false 'restart markers' refusals)."""
    rng = np.random.default_rng(7)
    img = Image.open(CLEVR_SAMPLE).convert("RGB")
    for i in range(24):
        w, h = (int(x) for x in rng.integers(9, 240, 2))
        save = dict(quality=80, subsampling=i % 3, progressive=bool(i % 2))
        save["restart_marker_blocks" if i % 4 < 2 else "restart_marker_rows"] = int(rng.integers(1, 4))
        im = img.resize((w, h)) if i % 5 else img.resize((w, h)).convert("L")
        buf = io.BytesIO()
        try:
            im.save(buf, "JPEG", **save)
        except OSError:  # libjpeg cannot write some restart + progressive combinations into a buffer
            continue
        assert check_jpeg(buf.getvalue()) == (w, h, save["progressive"])


def _oriented(fmt: str, orientation: int) -> tuple[bytes, np.ndarray]:
    """A 12x8 image whose pixels all differ, saved with an EXIF orientation tag, and the pixels as displayed."""
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    arr = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    ex = Image.Exif()
    ex[0x0112] = orientation
    buf = io.BytesIO()
    opts = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True, "exact": True}}.get(fmt, {})
    Image.fromarray(arr).save(buf, fmt, exif=ex.tobytes(), **opts)
    data = buf.getvalue()
    return data, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 5])
def test_exif_orientation_is_applied_before_the_crop(fmt, orientation, monkeypatch):
    """Re-encoded files and pixels show what a viewer shows (they carry no tag): an EXIF-turned photo is turned,
    and the crop is taken in displayed coordinates, with either PNG decoder (a WEBP's tag was once ignored)."""
    data, shown = _oriented(fmt, orientation)
    for spng in ("0", "1"):
        monkeypatch.setenv("OMNIBYTE_NO_SPNG", spng)
        monkeypatch.setattr(imgmod, "_SPNG", False)
        P = SERIALIZERS.get("pixels")
        full = P(P.Config(header=True, size=None))({"id": "x", "image": data})
        h, w = shown.shape[:2]
        assert [int(t) for t in full.tokens[:4]] == [h >> 8, h & 255, w >> 8, w & 255]
        got = np.asarray(full.tokens[5:], dtype=np.uint8).reshape(h, w, 3)
        assert np.abs(got.astype(int) - shown.astype(int)).max() <= (0 if fmt == "PNG" else 8)
        box = P(P.Config(header=False, size=None, crop_box=(1, 2, 4, 7)))({"id": "x", "image": data})
        assert np.array_equal(np.asarray(box.tokens, dtype=np.uint8).reshape(5, 3, 3), got[2:7, 1:4])
        J = SERIALIZERS.get("jpeg" if fmt == "JPEG" else "png")
        out = Image.open(io.BytesIO(J(J.Config(method="reencode"))({"id": "x", "image": data}).data_bytes()))
        assert out.size == (w, h) and 0x0112 not in out.getexif()
