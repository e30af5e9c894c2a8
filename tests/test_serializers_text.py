"""utf8 serializer: exact length, BOS/EOS, truncation, invalid UTF-8, 0x00, hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnibyte import vocab
from omnibyte.config import ConfigError
from omnibyte.errors import SerializationError
from omnibyte.registry import SERIALIZERS
from omnibyte.vocab import Modality


def utf8(**kw):
    return SERIALIZERS.build({"name": "utf8", **kw})


def test_registered_serializers():
    assert {"utf8", "pixels", "png", "jpeg", "qa"} <= set(SERIALIZERS.names())
    assert SERIALIZERS.get("png").is_image and not SERIALIZERS.get("utf8").is_image


def test_plain_text_round_trip_and_layout():
    s = utf8(bos=True, eos=True)({"id": "a", "text": "héllo\x00wörld"})
    b = "héllo\x00wörld".encode()
    assert len(s) == len(b) + 2
    assert s.tokens[0] == vocab.BOS and s.tokens[-1] == vocab.EOS
    assert s.tokens[1:-1].tolist() == list(b)
    assert s.modality[1:-1].tolist() == [Modality.TEXT] * len(b)
    assert s.modality[0] == s.modality[-1] == Modality.SPECIAL
    assert (s.loss_mask == 1).all() and s.id == "a"
    assert utf8().decode(s) == "héllo\x00wörld"
    s.validate()


def test_field_and_bytes_input():
    s = utf8(field="body")({"id": "b", "body": b"abc"})
    assert s.tokens.tolist() == [97, 98, 99]
    with pytest.raises(SerializationError, match="'b'.*no 'text' field"):
        utf8()({"id": "b", "body": "abc"})


def test_invalid_utf8_error_names_sample():
    with pytest.raises(SerializationError, match=r"sample 'bad7' \[utf8\]: invalid UTF-8 at byte 2"):
        utf8()({"id": "bad7", "text": b"ab\xff\xfecd"})
    with pytest.raises(SerializationError, match="bad8"):
        utf8()({"id": "bad8", "text": "lone \ud800 surrogate"})


def test_invalid_utf8_replace():
    s = utf8(errors="replace")({"id": "r", "text": b"ab\xffcd"})
    assert bytes(s.tokens.astype(np.uint8)) == "ab\ufffdcd".encode()
    assert utf8().decode(s) == "ab\ufffdcd"


@pytest.mark.parametrize("policy,expect", [("head", b"abcd"), ("tail", b"defg")])
def test_truncation(policy, expect):
    s = utf8(max_bytes=4, truncate=policy, eos=True)({"id": "t", "text": "abcdefg"})
    assert bytes(s.tokens[:-1].astype(np.uint8)) == expect and s.tokens[-1] == vocab.EOS


def test_truncation_error_by_default():
    with pytest.raises(SerializationError, match="'long'.*7 bytes, more than max_bytes=4"):
        utf8(max_bytes=4)({"id": "long", "text": "abcdefg"})
    assert len(utf8(max_bytes=7)({"id": "ok", "text": "abcdefg"})) == 7


def test_bad_config():
    with pytest.raises(ConfigError, match="truncate"):
        utf8(truncate="middle")
    with pytest.raises(ConfigError, match="max_bytes"):
        utf8(max_bytes=-1)


@settings(max_examples=150, deadline=None)
@given(text=st.text(), bos=st.booleans(), eos=st.booleans(), cap=st.integers(0, 40),
       policy=st.sampled_from(["head", "tail"]))
def test_property_length_and_round_trip(text, bos, eos, cap, policy):
    # text.encode can fail on lone surrogates: use replace so every str serializes
    ser = utf8(bos=bos, eos=eos, max_bytes=cap, truncate=policy, errors="replace")
    b = text.encode("utf-8", errors="replace")
    s = ser({"id": "h", "text": text})
    kept = min(len(b), cap) if cap else len(b)
    assert len(s) == int(bos) + kept + int(eos)  # the documented formula
    body = s.tokens[int(bos):len(s) - int(eos)]
    assert (body < 256).all()
    expect = b if not cap or len(b) <= cap else (b[:cap] if policy == "head" else b[len(b) - cap:])
    assert body.astype(np.uint8).tobytes() == expect
    if not cap or len(b) <= cap:
        assert ser.decode(s) == b.decode("utf-8")
    s2 = ser({"id": "h", "text": text})
    assert np.array_equal(s.tokens, s2.tokens) and np.array_equal(s.modality, s2.modality)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=64))
def test_property_bytes_input(raw):
    """Valid UTF-8 passes through byte for byte (0x00 included); invalid raises or is replaced."""
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    if valid:
        s = utf8()({"id": "x", "text": raw})
        assert s.tokens.astype(np.uint8).tobytes() == raw and (s.tokens < 256).all()
    else:
        with pytest.raises(SerializationError, match="'x'"):
            utf8()({"id": "x", "text": raw})
    s = utf8(errors="replace")({"id": "x", "text": raw})
    assert s.tokens.astype(np.uint8).tobytes() == raw.decode("utf-8", errors="replace").encode()
    assert (s.modality == Modality.TEXT).all()
