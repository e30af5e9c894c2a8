"""Token contract, ByteStream and Batch (omnibyte/vocab.py, omnibyte/stream.py)."""

from __future__ import annotations

import numpy as np
import pytest

from omnibyte import vocab
from omnibyte.stream import Batch, ByteStream
from omnibyte.vocab import Modality


def test_contract():
    assert vocab.VOCAB_SIZE % 8 == 0 and vocab.VOCAB_SIZE >= vocab.NUM_BYTES + vocab.NUM_SPECIALS
    specials = list(vocab.SPECIAL_NAMES)
    assert len(set(specials)) == len(specials) and min(specials) == 256
    assert all(vocab.is_special(t) for t in specials) and not vocab.is_special(0) and not vocab.is_special(255)
    assert set(vocab.SOM) == {m for m in Modality if m != Modality.SPECIAL}
    assert vocab.token_name(0) == "0x00" and vocab.token_name(vocab.BOS) == "BOS"
    assert Modality.parse("image") is Modality.IMAGE
    with pytest.raises(ValueError, match="unknown modality"):
        Modality.parse("audio")
    vocab.check_contract(vocab.CONTRACT_VERSION)
    with pytest.raises(ValueError, match="contract version"):
        vocab.check_contract(vocab.CONTRACT_VERSION + 1, where="ckpt.safetensors")


def test_bytes_zero_and_ff_are_data():
    s = ByteStream.from_bytes(b"\x00\xff\x00", Modality.IMAGE, id="x")
    assert s.tokens.dtype == np.uint16 and s.tokens.tolist() == [0, 255, 0]
    assert s.data_bytes() == b"\x00\xff\x00"
    full = ByteStream.concat([ByteStream.special(vocab.BOS), s, ByteStream.special(vocab.EOS)])
    assert full.data_bytes() == b"\x00\xff\x00"  # specials never leak into data
    assert full.data_bytes(Modality.IMAGE) == b"\x00\xff\x00"


def test_concat_slice_spans_validate():
    a = ByteStream.from_bytes(b"hello", Modality.TEXT, loss=0.5, id="s1")
    b = ByteStream.special(vocab.SOM_IMAGE)
    c = ByteStream.from_bytes(b"\x01\x02", Modality.IMAGE)
    s = ByteStream.concat([a, b, c])
    assert len(s) == 8 and s.id == "s1"
    assert s.spans() == [(Modality.TEXT, 0, 5), (Modality.SPECIAL, 5, 6), (Modality.IMAGE, 6, 8)]
    assert s[1:3].tokens.tolist() == [ord("e"), ord("l")] and s[1:3].loss_mask.tolist() == [0.5, 0.5]
    assert s.validate() is s
    with pytest.raises(TypeError):
        s[0]  # noqa: B018
    bad = ByteStream(np.array([1, 999], np.uint16), np.ones(2, np.float32), np.zeros(2, np.uint8), id="bad")
    with pytest.raises(ValueError, match="'bad'.*vocabulary size"):
        bad.validate()
    with pytest.raises(ValueError, match="lengths differ"):
        ByteStream(np.zeros(2, np.uint16), np.ones(3, np.float32), np.zeros(2, np.uint8)).validate()
    with pytest.raises(ValueError, match="must be uint16"):
        ByteStream(np.zeros(2, np.int64), np.ones(2, np.float32), np.zeros(2, np.uint8)).validate()
    with pytest.raises(ValueError, match="finite"):
        ByteStream(np.zeros(1, np.uint16), np.array([-1], np.float32), np.zeros(1, np.uint8)).validate()
    with pytest.raises(ValueError, match="not a special"):
        ByteStream.special(65)
    assert len(ByteStream.concat([])) == 0 and ByteStream.empty().spans() == []


def test_batch_collate():
    import torch

    s1 = ByteStream.from_bytes(b"abc", Modality.TEXT, id="a")
    s2 = ByteStream.from_bytes(b"\x00", Modality.IMAGE, loss=0.25, id="b")
    b = Batch.collate([s1, s2], pad_to_multiple=4)
    assert b.shape == (2, 4) and b.tokens.dtype == torch.int64
    assert b.tokens[1].tolist() == [0, vocab.PAD, vocab.PAD, vocab.PAD]
    assert b.loss_mask[1].tolist() == [0.25, 0, 0, 0] and b.lengths.tolist() == [3, 1]
    assert b.modality[1].tolist() == [Modality.IMAGE, 0, 0, 0] and b.ids == ["a", "b"]
    with pytest.raises(ValueError, match="'a' has 3 tokens"):
        Batch.collate([s1, s2], length=2)
    with pytest.raises(ValueError, match="empty"):
        Batch.collate([])
    assert b.to("cpu").tokens.equal(b.tokens)
