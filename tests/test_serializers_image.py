"""png, jpeg and pixels serializers: round trips, determinism, exact lengths, bad input, 0x00/0xFF.

Real data: the 8 CLEVR renders in ../shared/data/clevr-gen/sample-images (skipped without them).
Generated data: random noise, gradients, all-0x00 and all-0xFF images in RGB, RGBA, L and P.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from omnibyte.config import ConfigError
from omnibyte.errors import SerializationError
from omnibyte.registry import SERIALIZERS
from omnibyte.vocab import Modality

# ../shared beside the checkout (a git worktree may sit one level deeper)
RENDERS = next((p / "shared" / "data" / "clevr-gen" / "sample-images" for p in Path(__file__).resolve().parents
                if (p / "shared" / "data" / "clevr-gen" / "sample-images").is_dir()),
               Path(__file__).parents[2] / "shared" / "data" / "clevr-gen" / "sample-images")
CLEVR = sorted(RENDERS.glob("*.png")) if RENDERS.is_dir() else []
needs_clevr = pytest.mark.skipif(not CLEVR, reason=f"no CLEVR renders at {RENDERS}")


def build(**kw):
    return SERIALIZERS.build(kw)


def png_bytes(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG", **save)
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, "JPEG", **save)
    return buf.getvalue()


def generated() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:37, 0:53]
    grad = np.stack([x * 255 // 52, y * 255 // 36, (x + y) * 255 // 88], -1).astype(np.uint8)
    return {
        "noise": rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
        "gradient": grad,
        "zeros": np.zeros((37, 53, 3), np.uint8),
        "ones": np.full((37, 53, 3), 255, np.uint8),
    }


GEN = generated()


def gen_pngs() -> list[tuple[str, bytes, np.ndarray]]:
    """(name, PNG file, expected RGB pixels) in several PNG colour types."""
    out = []
    for name, arr in GEN.items():
        out.append((f"{name}-rgb", png_bytes(arr), arr))
        rgba = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], -1)
        out.append((f"{name}-rgba", png_bytes(rgba, "RGBA"), arr))
        gray = arr[..., 0]
        out.append((f"{name}-l", png_bytes(gray, "L"), np.repeat(gray[..., None], 3, -1)))
    pal = Image.fromarray(GEN["gradient"]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    out.append(("gradient-p", buf.getvalue(), np.asarray(pal.convert("RGB"))))
    return out


GEN_PNGS = gen_pngs()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def chunks(data: bytes) -> list[bytes]:
    pos, out = 8, []
    while pos < len(data):
        n, t = struct.unpack_from(">I4s", data, pos)
        out.append(t)
        pos += 12 + n
    return out


# ----------------------------------------------------------------------------------------------
# passthrough


@needs_clevr
def test_png_passthrough_clevr_round_trip():
    ser = build(name="png")
    for f in CLEVR:
        data = f.read_bytes()
        s = ser({"id": f.stem, "image": data})
        assert len(s) == len(data)  # L = len(file)
        assert ser.decode(s) == data and s.data_bytes() == data
        assert (s.modality == Modality.IMAGE).all() and (s.loss_mask == 1).all() and (s.tokens < 256).all()
        assert np.array_equal(s.tokens, ser({"id": f.stem, "image": data}).tokens)
        assert ser.is_image and len(ser.encode_image(data, "x")) == len(data)


def test_png_passthrough_generated_and_verify_levels():
    for verify in ("structure", "crc", "decode"):
        ser = build(name="png", verify=verify)
        for name, data, _ in GEN_PNGS:
            assert ser.decode(ser({"id": name, "image": data})) == data


def test_jpeg_passthrough_round_trip():
    ser = build(name="jpeg")
    for name, arr in GEN.items():
        for sub in (0, 1, 2):
            data = jpeg_bytes(arr, quality=90, subsampling=sub)
            s = ser({"id": name, "image": data})
            assert len(s) == len(data) and ser.decode(s) == data
    data = jpeg_bytes(GEN["noise"], progressive=True)
    assert build(name="jpeg", verify="decode").decode(ser({"id": "p", "image": data})) == data
    with pytest.raises(SerializationError, match="'p'.*progressive"):
        build(name="jpeg", allow_progressive=False)({"id": "p", "image": data})


# ----------------------------------------------------------------------------------------------
# re-encode


def test_png_reencode_lossless_and_exact_layout():
    ser = build(name="png", method="reencode")
    for name, data, rgb in GEN_PNGS:
        s = ser({"id": name, "image": data})
        out = ser.decode(s)
        assert np.array_equal(decoded(out), rgb), name  # lossless at the same size
        assert chunks(out) == [b"IHDR", b"IDAT", b"IEND"]  # no metadata chunks
        idat_len = struct.unpack_from(">I", out, 33)[0]
        assert len(s) == 8 + 25 + 12 + idat_len + 12 == 57 + idat_len  # documented formula
        assert ser({"id": name, "image": out}).tokens.tobytes() == s.tokens.tobytes()  # idempotent


@pytest.mark.parametrize("flt", ["none", "sub", "up", "average", "paeth", "adaptive"])
def test_png_writer_filters_are_lossless(flt):
    ser = build(name="png", method="reencode", filter=flt, compress_level=1)
    for name, data, rgb in GEN_PNGS[:6]:
        assert np.array_equal(decoded(ser.decode(ser({"id": name, "image": data}))), rgb)
    ser = build(name="png", method="reencode", filter=flt, mode="L")
    out = ser.decode(ser({"id": "g", "image": GEN_PNGS[0][1]}))
    assert Image.open(io.BytesIO(out)).mode == "L"


@needs_clevr
def test_reencode_clevr_deterministic_and_sized():
    pngs = [build(name="png", method="reencode", size=[62, 41], crop=0.1, compress_level=c) for c in (1, 9)]
    jpg = build(name="jpeg", method="reencode", size=[62, 41], crop=0.1, quality=85, subsampling="4:4:4")
    for f in CLEVR[:4]:
        data = f.read_bytes()
        for ser in (*pngs, jpg):
            a, b = ser({"id": f.stem, "image": data}), ser({"id": f.stem, "image": data})
            assert np.array_equal(a.tokens, b.tokens)
            im = Image.open(io.BytesIO(ser.decode(a)))
            assert im.size == (62, 41) and im.mode == "RGB"
        out = jpg.decode(jpg({"id": f.stem, "image": data}))
        assert out[:2] == b"\xff\xd8" and out[-2:] == b"\xff\xd9"
        assert b"Exif" not in out[:200] and b"ICC_PROFILE" not in out
        # re-encoded pixels equal the pixels serializer's view of the same pipeline
        pix = build(name="pixels", size=[62, 41], crop=0.1)
        ref = np.asarray(pix.decode(pix({"id": f.stem, "image": data})))
        assert np.array_equal(decoded(pngs[0].decode(pngs[0]({"id": f.stem, "image": data}))), ref)


def test_jpeg_reencode_quality_and_subsampling():
    arr = GEN["gradient"]
    src = png_bytes(arr)
    for sub in ("4:4:4", "4:2:2", "4:2:0"):
        ser = build(name="jpeg", method="reencode", quality=95, subsampling=sub)
        out = ser.decode(ser({"id": sub, "image": src}))
        err = np.abs(decoded(out).astype(int) - arr.astype(int)).mean()
        assert err < 4, (sub, err)
        assert out[2:4] == b"\xff\xe0"  # JFIF APP0, then no other APPn segment
        assert b"\xff\xe1" not in out[:64] and b"\xff\xc2" not in out  # no EXIF, not progressive
    lo = build(name="jpeg", method="reencode", quality=10)({"id": "q", "image": src})
    hi = build(name="jpeg", method="reencode", quality=95)({"id": "q", "image": src})
    assert len(lo) < len(hi)


def test_jpeg_reencode_from_jpeg_uses_draft_and_is_deterministic():
    big = np.asarray(Image.fromarray(GEN["gradient"]).resize((480, 320)))
    src = jpeg_bytes(big, quality=90)
    ser = build(name="jpeg", method="reencode", size=[62, 41], crop=0.1)
    a, b = ser({"id": "j", "image": src}), ser({"id": "j", "image": src})
    assert np.array_equal(a.tokens, b.tokens)
    assert Image.open(io.BytesIO(ser.decode(a))).size == (62, 41)


def test_draft_crop_box_is_an_exact_dct_scale_when_the_width_is_not_a_multiple_of_8(monkeypatch):
    """A JPEG decoded at 1/8 by DCT scaling: its crop box was scaled by scaled/full size (126/1001 for a
    1001-pixel width), up to a scaled pixel off at the far edge. A sharp edge lands where the full decode puts it."""
    from omnibyte.serializers._image import draft_box

    assert draft_box((50, 30, 951, 571), (1001, 601), (126, 76)) == (50 / 8, 30 / 8, 951 / 8, 571 / 8)
    assert draft_box((0, 0, 1000, 600), (1000, 600), (250, 150)) == (0, 0, 250, 150)
    arr = np.zeros((601, 1001, 3), np.uint8)
    arr[:, 900:] = 255  # a vertical edge near the right side of the crop
    src = jpeg_bytes(arr, quality=95)
    ser = build(name="pixels", size=[110, 66], crop=0.1)
    fast = np.asarray(ser.decode(ser({"id": "e", "image": src}))).astype(float)
    monkeypatch.setattr(Image.Image, "draft", lambda self, mode, size: None)  # the full-size decode
    full = np.asarray(ser.decode(ser({"id": "e", "image": src}))).astype(float)
    # the edge's column (where the row crosses mid-grey) agrees to a fraction of an output pixel
    def edge(px):
        row = px[33, :, 0]
        i = int(np.argmax(row > 127))
        return i - 1 + (127 - row[i - 1]) / (row[i] - row[i - 1])

    assert abs(edge(fast) - edge(full)) < 0.25, (edge(fast), edge(full))


def test_alpha_composited_on_background():
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200
    arr[:4, :, 3] = 0  # top half fully transparent
    arr[4:, :, 3] = 255
    data = png_bytes(arr, "RGBA")
    for bg in ((255, 255, 255), (0, 10, 20)):
        ser = build(name="pixels", background=list(bg), header=True)
        px = np.asarray(ser.decode(ser({"id": "a", "image": data})))
        assert (px[:4] == bg).all() and (px[4:] == (200, 0, 0)).all()


# ----------------------------------------------------------------------------------------------
# pixels


@needs_clevr
def test_pixels_clevr_exact_and_drops_alpha():
    for f in CLEVR:
        data = f.read_bytes()
        rgb = np.asarray(Image.open(f).convert("RGB"))
        for order in ("raster", "patch"):
            ser = build(name="pixels", order=order, patch=16, header=True)
            s = ser({"id": f.stem, "image": data})
            assert len(s) == ser.expected_length(320, 240) == 5 + 240 * 320 * 3
            assert np.array_equal(np.asarray(ser.decode(s)), rgb)
        ser = build(name="pixels")
        assert ser({"id": f.stem, "image": data}).data_bytes() == rgb.tobytes()  # raster = H, W, C order


def test_pixels_patch_order_is_tiles():
    arr = GEN["noise"][:8, :8]
    ser = build(name="pixels", order="patch", patch=4)
    t = ser({"id": "p", "image": png_bytes(arr)}).tokens.astype(np.uint8)
    assert t[:48].tobytes() == arr[:4, :4].tobytes()  # first tile, raster inside
    assert t[48:96].tobytes() == arr[:4, 4:8].tobytes()  # then the tile to its right


def test_pixels_bits_and_mode():
    arr = GEN["gradient"]
    for bits in (1, 3, 5, 8):
        ser = build(name="pixels", bits=bits, mode="L", header=True)
        s = ser({"id": "b", "image": png_bytes(arr)})
        body = s.tokens[5:]
        assert body.max() < 2**bits and len(body) == 37 * 53
        back = np.asarray(ser.decode(s)).astype(int)
        ref = np.asarray(Image.fromarray(arr).convert("L")).astype(int)
        assert np.abs(back - ref).max() <= 256 // 2**bits


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 24), w=st.integers(1, 24), order=st.sampled_from(["raster", "patch"]),
       patch=st.integers(1, 9), bits=st.integers(1, 8), header=st.booleans(),
       mode=st.sampled_from(["RGB", "L"]), src=st.sampled_from(["RGB", "RGBA", "L"]), seed=st.integers(0, 99))
def test_pixels_property(h, w, order, patch, bits, header, mode, src, seed):
    rng = np.random.default_rng(seed)
    c = {"RGB": 3, "RGBA": 4, "L": 1}[src]
    arr = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    if src == "RGBA":
        arr[..., 3] = 255
    data = png_bytes(arr[..., 0] if c == 1 else arr, src)
    ser = build(name="pixels", order=order, patch=patch, bits=bits, header=header, mode=mode)
    s = ser({"id": "h", "image": data})
    C = 3 if mode == "RGB" else 1
    if order == "patch":
        expect = 5 * header + -(-h // patch) * patch * -(-w // patch) * patch * C
    else:
        expect = 5 * header + h * w * C
    assert len(s) == expect == ser.expected_length(w, h)
    assert (s.tokens < 256).all() and (s.modality == Modality.IMAGE).all()
    assert np.array_equal(s.tokens, ser({"id": "h", "image": data}).tokens)
    if header:
        img = ser.decode(s)
        assert img.size == (w, h) and img.mode == mode
        if bits == 8:
            ref = Image.open(io.BytesIO(data)).convert(mode)
            assert np.array_equal(np.asarray(img), np.asarray(ref))


def test_pixels_decode_without_header_needs_size():
    data = png_bytes(GEN["noise"])
    ser = build(name="pixels", size=[10, 7])
    assert ser.decode(ser({"id": "s", "image": data})).size == (10, 7)
    with pytest.raises(ValueError, match="header"):
        build(name="pixels").decode(build(name="pixels")({"id": "s", "image": data}))


# ----------------------------------------------------------------------------------------------
# 0x00 / 0xFF, decoders


@pytest.mark.parametrize("name", ["zeros", "ones"])
def test_extreme_bytes_survive(name):
    arr = GEN[name]
    val = int(arr.flat[0])
    s = build(name="pixels")({"id": name, "image": png_bytes(arr)})
    assert (s.tokens == val).all()  # 0x00 stays 0 and 0xFF stays 255: never a special id (>= 256)
    for ser, data in ((build(name="png"), png_bytes(arr)), (build(name="jpeg"), jpeg_bytes(arr)),
                      (build(name="png", method="reencode"), png_bytes(arr)),
                      (build(name="jpeg", method="reencode"), png_bytes(arr))):
        s = ser({"id": name, "image": data})
        raw = np.frombuffer(ser.decode(s), np.uint8)
        assert np.array_equal(s.tokens, raw.astype(np.uint16)) and (s.tokens < 256).all()
        assert (raw == 0).any() and (raw == 255).any()  # both values really occur in these files
        assert np.array_equal(decoded(ser.decode(s)), np.asarray(Image.fromarray(arr)))


@needs_clevr
def test_spng_and_pillow_decoders_agree(monkeypatch):
    pytest.importorskip("pyspng")
    import omnibyte.serializers._image as imgmod

    cases = [dict(name="pixels"), dict(name="pixels", mode="L", crop=0.2, size=[50, 30]),
             dict(name="png", method="reencode", size=[62, 41], crop=0.1)]
    datas = [f.read_bytes() for f in CLEVR] + [d for _, d, _ in GEN_PNGS]
    semi = GEN["noise"].copy()
    datas.append(png_bytes(np.concatenate([semi, semi[..., :1]], -1), "RGBA"))  # real transparency
    for node in cases:
        ser = SERIALIZERS.build(node)
        outs = []
        for off in ("0", "1"):
            monkeypatch.setenv("OMNIBYTE_NO_SPNG", off)
            monkeypatch.setattr(imgmod, "_SPNG", False)
            outs.append([ser({"id": "d", "image": d}).tokens.tobytes() for d in datas])
        assert outs[0] == outs[1], node


# ----------------------------------------------------------------------------------------------
# bad input


def _truncations(data: bytes) -> list[bytes]:
    return [data[:n] for n in (0, 7, 20, 40, len(data) // 2, len(data) - 13, len(data) - 1)]


def test_truncated_png_names_sample():
    data = GEN_PNGS[0][1]
    for ser in (build(name="png"), build(name="png", method="reencode"), build(name="pixels"),
                build(name="jpeg", method="reencode")):
        for cut in _truncations(data):
            with pytest.raises(SerializationError, match=rf"sample 'cut{len(cut)}' \[{ser.name}\]"):
                ser({"id": f"cut{len(cut)}", "image": cut})


def test_png_structure_errors():
    data = GEN_PNGS[0][1]
    ser = build(name="png")
    with pytest.raises(SerializationError, match="after IEND"):
        ser({"id": "tail", "image": data + b"junk"})
    bad = bytearray(data)
    bad[60] ^= 0xFF  # inside the first IDAT payload
    ser({"id": "crc", "image": bytes(bad)})  # structure check alone does not read the data
    with pytest.raises(SerializationError, match="'crc'.*CRC mismatch"):
        build(name="png", verify="crc")({"id": "crc", "image": bytes(bad)})
    with pytest.raises(SerializationError, match="'crc'"):
        build(name="png", verify="decode")({"id": "crc", "image": bytes(bad)})
    with pytest.raises(SerializationError, match="looks like JPEG"):
        ser({"id": "j", "image": jpeg_bytes(GEN["noise"])})


def test_corrupt_jpeg_names_sample():
    data = jpeg_bytes(GEN["noise"])
    bad_len = data[:4] + b"\x00\x01" + data[6:]  # APP0 segment length 1
    no_sof = b"\xff\xd8" + b"\xff\xda\x00\x08" + bytes(6) + b"\xff\xd9"  # scan without a frame header
    garbage = b"\xff\xd8\xff" + bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8))
    for ser in (build(name="jpeg"), build(name="jpeg", method="reencode"), build(name="pixels")):
        for i, bad in enumerate((bad_len, no_sof, garbage, data[:-2], data[: len(data) // 2])):
            with pytest.raises(SerializationError, match=rf"sample 'j{i}' \[{ser.name}\]"):
                ser({"id": f"j{i}", "image": bad})


@pytest.mark.parametrize("name", ["png", "jpeg", "pixels"])
def test_non_image_bytes(name):
    rng = np.random.default_rng(2)
    for i, junk in enumerate((rng.integers(0, 256, 1000, dtype=np.uint8).tobytes(), b"", b"hello world",
                              b"%PDF-1.4 ...")):
        for ser in (build(name=name), build(name=name, **({} if name == "pixels" else {"method": "reencode"}))):
            with pytest.raises(SerializationError, match=rf"sample 'n{i}'"):
                ser({"id": f"n{i}", "image": junk})
    with pytest.raises(SerializationError, match="'s'.*must hold the image file bytes"):
        build(name=name)({"id": "s", "image": "path/to/file.png"})
    with pytest.raises(SerializationError, match="'m'.*no 'image' field"):
        build(name=name)({"id": "m"})


def _bomb(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (its data would inflate to gigabytes)."""
    def chunk(t, p):
        return struct.pack(">I", len(p)) + t + p + struct.pack(">I", zlib.crc32(t + p))
    raw = zlib.compress(b"\x00" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@pytest.mark.parametrize("node", [dict(name="png"), dict(name="png", method="reencode"), dict(name="pixels"),
                                  dict(name="jpeg", method="reencode")])
def test_oversize_and_bomb_refused(node):
    bomb = _bomb(100_000, 100_000)
    with pytest.raises(SerializationError, match=r"'bomb'.*exceeds max_pixels"):
        SERIALIZERS.build(node)({"id": "bomb", "image": bomb})
    data = GEN_PNGS[0][1]
    with pytest.raises(SerializationError, match=r"'big'.*37 = 1961 pixels exceeds max_pixels=1000"):
        SERIALIZERS.build({**node, "max_pixels": 1000})({"id": "big", "image": data})
    with pytest.raises(SerializationError, match=r"'fat'.*exceeds max_file_bytes=100"):
        SERIALIZERS.build({**node, "max_file_bytes": 100})({"id": "fat", "image": data})


def test_jpeg_oversize_from_header():
    data = jpeg_bytes(GEN["noise"])
    with pytest.raises(SerializationError, match="'big'.*exceeds max_pixels"):
        build(name="jpeg", max_pixels=100)({"id": "big", "image": data})


def test_bad_configs():
    for node, pat in ((dict(name="png", compress_level=12), "compress_level"),
                      (dict(name="jpeg", quality=0), "quality"),
                      (dict(name="jpeg", subsampling="4:1:1"), "subsampling"),
                      (dict(name="pixels", bits=9), "bits"),
                      (dict(name="pixels", crop=1.5), "crop"),
                      (dict(name="pixels", mode="CMYK"), "mode"),
                      (dict(name="png", methd="reencode"), "did you mean 'method'")):
        with pytest.raises(ConfigError, match=pat):
            SERIALIZERS.build(node)
    with pytest.raises(SerializationError, match="crop_box .* exceeds"):
        build(name="pixels", crop_box=[0, 0, 100, 100])({"id": "c", "image": GEN_PNGS[0][1]})
