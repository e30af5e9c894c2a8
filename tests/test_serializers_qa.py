"""qa serializer: layout, exact length, orders, loss policies, prompt/answer_tokens, decode, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnibyte import vocab
from omnibyte.config import ConfigError, dump_yaml, from_dict, to_dict
from omnibyte.errors import SerializationError
from omnibyte.registry import SERIALIZERS
from omnibyte.vocab import Modality

RENDERS = Path(__file__).parents[2] / "shared" / "data" / "clevr-gen" / "sample-images"
CLEVR = sorted(RENDERS.glob("*.png")) if RENDERS.is_dir() else []
EXAMPLE = Path(__file__).parents[1] / "omnibyte" / "examples" / "clevr_sample.png"
Q, A = "What color is the large rubber sphere?", "cyan"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def images() -> list[bytes]:
    out = [f.read_bytes() for f in CLEVR[:3]] or [EXAMPLE.read_bytes()]
    out.append(png(np.zeros((9, 11, 3), np.uint8)))  # all 0x00 pixels
    out.append(png(np.full((9, 11, 3), 255, np.uint8)))  # all 0xFF pixels
    return out


IMAGES = images()


def qa(**kw):
    return SERIALIZERS.build({"name": "qa", **kw})


def sample(img: bytes, q: str = Q, a: str = A, sid: str = "s1") -> dict:
    return {"id": sid, "image": img, "question": q, "answer": a}


IMAGE_NODES = [
    {"name": "png"},
    {"name": "png", "method": "reencode", "size": [62, 41], "crop": 0.1},
    {"name": "jpeg", "method": "reencode", "size": [62, 41]},
    {"name": "pixels", "size": [16, 12], "order": "patch", "patch": 4, "header": True},
]


@pytest.mark.parametrize("node", IMAGE_NODES, ids=lambda n: n["name"] + "-" + n.get("method", ""))
def test_layout_length_and_round_trip(node):
    ser = qa(image=node)
    for img in IMAGES:
        s = ser(sample(img))
        s.validate()
        img_stream = ser.image.encode_image(img, "s1")
        L_img, q, a = len(img_stream), Q.encode(), A.encode()
        assert len(s) == 1 + (2 + L_img) + (2 + len(q)) + 2 + len(a)  # documented formula
        t = s.tokens
        assert t[0] == vocab.BOS and t[1] == vocab.SOM_IMAGE and t[2 + L_img] == vocab.EOM
        assert np.array_equal(t[2:2 + L_img], img_stream.tokens)
        assert t[3 + L_img] == vocab.SOM_QUESTION and t[-len(a) - 2] == vocab.SOM_ANSWER and t[-1] == vocab.EOS
        # bytes (0x00 and 0xFF included) are never specials, and every special is a marker
        n_markers = 1 + 2 + 2 + 2
        assert int((t >= vocab.NUM_BYTES).sum()) == n_markers
        assert ((t >= vocab.NUM_BYTES) == (s.modality == Modality.SPECIAL)).all()
        assert (s.modality[2:2 + L_img] == Modality.IMAGE).all()
        back = ser.decode(s)
        assert back["question"] == Q and back["answer"] == A
        assert back["image"] == img_stream.data_bytes()
        if node == {"name": "png"}:
            assert back["image"] == img  # passthrough: the file itself
        assert np.array_equal(ser(sample(img)).tokens, t)  # deterministic


def test_extreme_bytes_present_and_intact():
    ser = qa(image={"name": "pixels", "header": True})
    for img, val in ((IMAGES[-2], 0), (IMAGES[-1], 255)):
        s = ser(sample(img))
        body = s.tokens[s.modality == Modality.IMAGE]
        assert (body[5:] == val).all()  # after the 5-byte header


def test_qiqa_order():
    ser = qa(order=["question", "image", "question", "answer"])
    img = IMAGES[0]
    s = ser(sample(img))
    q = Q.encode()
    assert len(s) == 1 + 2 * (2 + len(q)) + (2 + len(img)) + 2 + len(A)
    assert s.tokens[1] == vocab.SOM_QUESTION
    kinds = [m for m, _, _ in s.spans() if m != Modality.SPECIAL]
    assert kinds == [Modality.QUESTION, Modality.IMAGE, Modality.QUESTION, Modality.ANSWER]
    assert ser.decode(s) == {"image": img, "question": Q, "answer": A}


@pytest.mark.parametrize("order", [["image", "question", "answer"], ["question", "image", "question", "answer"]])
def test_image_align_starts_every_image_at_a_multiple_with_unweighted_pads(order):
    """image_align: as few PADs after SOM_IMAGE as put the first image byte at a multiple of it, whatever came
    before (question-first streams shift with the question's length); the PADs weigh 0 under every loss policy,
    decode skips them, and image_align=1 is the stream without them."""
    node = {"name": "pixels", "size": [8, 5]}
    img = IMAGES[0]
    plain = qa(image=node, order=order)(sample(img))
    for q in (Q, "Is there a cube?", "x" * 13):
        for loss in ("answer", "all", "weights"):
            ser = qa(image=node, order=order, image_align=12, loss=loss, weights={"special": 1.0})
            s = ser(sample(img, q=q))
            s.validate()
            t = s.tokens
            first = int(np.flatnonzero(s.modality == Modality.IMAGE)[0])
            assert first % 12 == 0 and t[first - 1] in (vocab.PAD, vocab.SOM_IMAGE)
            som = int(np.flatnonzero(t == vocab.SOM_IMAGE)[0])
            pads = first - som - 1
            assert 0 <= pads < 12 and (t[som + 1:first] == vocab.PAD).all()
            assert int((t == vocab.PAD).sum()) == pads and (s.loss_mask[t == vocab.PAD] == 0).all()
            assert (s.modality[t == vocab.PAD] == Modality.SPECIAL).all()
            ref = qa(image=node, order=order, loss=loss, weights={"special": 1.0})(sample(img, q=q))
            assert len(s) == len(ref) + pads  # the documented length, plus the PADs
            assert ser.decode(s) == ref_decode(ref, order, node)
    assert np.array_equal(qa(image=node, order=order, image_align=1)(sample(img)).tokens, plain.tokens)
    with pytest.raises((ValueError, ConfigError), match="image_align"):
        qa(image_align=0)


def ref_decode(stream, order, node):
    return qa(image=node, order=order).decode(stream)


def test_loss_policies():
    img = IMAGES[-2]
    s_all = qa(loss="all")(sample(img))
    assert (s_all.loss_mask == 1).all()
    s_ans = qa()(sample(img))  # default: answer
    w = s_ans.loss_mask
    assert w.sum() == len(A) + 1 and w[-1] == 1  # answer bytes + EOS
    assert (w[s_ans.modality == Modality.ANSWER] == 1).all()
    s_w = qa(loss="weights", weights={"image": 0.25, "question": 0.5, "special": 0.0, "answer": 2.0})(sample(img))
    m, w = s_w.modality, s_w.loss_mask
    assert w.dtype == np.float32
    assert (w[m == Modality.IMAGE] == 0.25).all() and (w[m == Modality.QUESTION] == 0.5).all()
    assert (w[m == Modality.ANSWER] == 2.0).all() and w[-1] == 2.0  # EOS takes the answer weight
    assert (w[:-1][m[:-1] == Modality.SPECIAL] == 0).all()
    s_d = qa(loss="weights", weights={"image": 0.1})(sample(img))  # missing keys mean 1.0
    assert np.isclose(s_d.loss_mask[s_d.modality == Modality.IMAGE], 0.1).all()
    assert (s_d.loss_mask[s_d.modality == Modality.QUESTION] == 1).all()


def test_prompt_and_answer_tokens():
    ser = qa()
    img = IMAGES[0]
    full = ser(sample(img))
    p = ser.prompt({"id": "g", "image": img, "question": Q})  # no answer needed
    assert p.tokens[-1] == vocab.SOM_ANSWER
    assert len(p) == len(full) - len(A.encode()) - 1
    assert np.array_equal(np.concatenate([p.tokens, ser.answer_tokens(A)]), full.tokens)
    assert ser.answer_tokens("ja") == [ord("j"), ord("a"), vocab.EOS]
    assert ser.decode(p)["answer"] == ""


@pytest.mark.parametrize("q,a,msg", [("", A, "empty question"), ("   ", A, "empty question"),
                                     (Q, "", "empty answer"), (Q, "\n", "empty answer")])
def test_empty_question_or_answer(q, a, msg):
    with pytest.raises(SerializationError, match=rf"sample 'bad' \[qa\]: {msg}"):
        qa()(sample(IMAGES[0], q, a, sid="bad"))


def test_bad_inputs_name_the_sample():
    ser = qa()
    with pytest.raises(SerializationError, match="'m'.*no 'answer' field"):
        ser({"id": "m", "image": IMAGES[0], "question": Q})
    with pytest.raises(SerializationError, match="'m'.*no 'question' field"):
        ser({"id": "m", "image": IMAGES[0], "answer": A})
    with pytest.raises(SerializationError, match="'t'.*truncated PNG"):
        ser(sample(IMAGES[0][:500], sid="t"))
    with pytest.raises(SerializationError, match="'r'.*not a PNG"):
        ser(sample(b"\x01\x02" * 300, sid="r"))
    with pytest.raises(SerializationError, match="'u'.*question is not valid UTF-8"):
        ser(sample(IMAGES[0], q=b"\xff\xfe", sid="u"))
    with pytest.raises(SerializationError, match="'o'.*exceeds max_pixels"):
        qa(image={"name": "png", "max_pixels": 10})(sample(IMAGES[0], sid="o"))
    with pytest.raises(SerializationError, match="'n'.*answer must be a string"):
        ser(sample(IMAGES[0], a=3, sid="n"))


def test_config_validation():
    with pytest.raises(ConfigError, match="not an image serializer"):
        qa(image="utf8")
    for order in (["image", "question"], ["answer", "question"], ["answer", "image", "answer"]):
        with pytest.raises(ConfigError, match="answer"):
            qa(order=order)
    with pytest.raises(ConfigError, match="unknown key 'text'"):
        qa(loss="weights", weights={"text": 1.0})
    with pytest.raises(ConfigError, match="is not one of"):
        qa(order=["picture", "answer"])
    with pytest.raises(ConfigError, match="did you mean 'image'"):
        qa(imag="png")


def test_config_round_trip_and_default_image():
    cls = SERIALIZERS.get("qa")
    cfg = from_dict(cls.Config, {"name": "qa", "image": {"name": "jpeg", "quality": 80}})
    again = from_dict(cls.Config, to_dict(cfg))
    assert again == cfg and "quality: 80" in dump_yaml(cfg)
    assert cls().config.image.name == "png"  # built directly in Python
    for name in ("utf8", "png", "jpeg", "pixels", "qa"):
        c = SERIALIZERS.get(name).Config(name=name)
        assert from_dict(SERIALIZERS.get(name).Config, to_dict(c)) == c
