"""``utf8``: text as its UTF-8 bytes.

Output, for text bytes ``b = utf8(sample[field])`` (after the ``errors`` policy):

    [BOS]  b[:max_bytes] or b[-max_bytes:]  [EOS]

Exact length: ``L = bos + min(len(b), max_bytes or inf) + eos`` (``bos`` / ``eos`` are 0 or 1). With
``errors: replace``, bytes input has each invalid sequence replaced by U+FFFD (3 bytes, ``EF BF BD``) as
Python's ``bytes.decode(errors="replace")`` splits them, and str input has each unencodable character (a
lone surrogate) replaced by ``?``; ``len(b)`` is the length after replacement. Valid UTF-8, byte 0x00
included, passes through unchanged (0xFF never occurs in valid UTF-8).

Text bytes have modality TEXT, BOS / EOS modality SPECIAL; the loss mask is 1 everywhere.
Truncation is by bytes (the model is byte level), so a cut may split a multi-byte character;
``decode`` then shows U+FFFD for the partial character.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from omnibyte import vocab
from omnibyte.stream import ByteStream
from omnibyte.vocab import Modality

from .base import SERIALIZERS, Serializer, SerializerConfig


@SERIALIZERS.register("utf8")
class UTF8Serializer(Serializer):
    """Text as UTF-8 bytes, with an invalid-UTF-8 policy, optional truncation and BOS/EOS."""

    @dataclass(frozen=True)
    class Config(SerializerConfig):
        field: str = "text"  # sample key holding the text (str, or bytes that must be UTF-8)
        errors: Literal["error", "replace"] = "error"  # invalid UTF-8 (bytes input) or lone surrogates (str)
        max_bytes: int = 0  # cap on the text bytes (BOS/EOS not counted); 0 = no cap
        truncate: Literal["error", "head", "tail"] = "error"  # over max_bytes: fail | keep first | keep last
        bos: bool = False  # prepend BOS
        eos: bool = False  # append EOS

        def __post_init__(self) -> None:
            if self.max_bytes < 0:
                raise ValueError(f"max_bytes must be >= 0, got {self.max_bytes}")

    modality = Modality.TEXT

    def text_bytes(self, sample: Mapping[str, Any]) -> bytes:
        """The UTF-8 bytes of the sample's text, after the errors policy and before truncation."""
        cfg = self.config
        if cfg.field not in sample:
            raise self.fail(sample, f"sample has no {cfg.field!r} field (keys: {', '.join(map(str, sample))})")
        text = sample[cfg.field]
        if isinstance(text, str):
            try:
                return text.encode("utf-8")
            except UnicodeEncodeError as e:
                if cfg.errors == "error":
                    raise self.fail(sample, f"text is not encodable as UTF-8 ({e.reason} at character "
                                            f"{e.start}); use errors=replace") from None
                return text.encode("utf-8", errors="replace")
        if isinstance(text, (bytes, bytearray, memoryview)):
            raw = bytes(text)
            try:
                raw.decode("utf-8")
                return raw
            except UnicodeDecodeError as e:
                if cfg.errors == "error":
                    raise self.fail(sample, f"invalid UTF-8 at byte {e.start} ({e.reason}: "
                                            f"{raw[e.start:e.end]!r}); use errors=replace") from None
                return raw.decode("utf-8", errors="replace").encode("utf-8")
        raise self.fail(sample, f"field {cfg.field!r} must be str or bytes, got {type(text).__name__}")

    def serialize(self, sample: Mapping[str, Any]) -> ByteStream:
        cfg = self.config
        b = self.text_bytes(sample)
        if cfg.max_bytes and len(b) > cfg.max_bytes:
            if cfg.truncate == "error":
                raise self.fail(sample, f"text has {len(b)} bytes, more than max_bytes={cfg.max_bytes} "
                                        f"(set truncate=head or tail to cut)")
            b = b[:cfg.max_bytes] if cfg.truncate == "head" else b[len(b) - cfg.max_bytes:]
        n, lead = len(b), int(cfg.bos)
        L = lead + n + int(cfg.eos)
        tokens = np.empty(L, dtype=np.uint16)
        modality = np.full(L, int(Modality.TEXT), dtype=np.uint8)
        tokens[lead:lead + n] = np.frombuffer(b, dtype=np.uint8)
        if cfg.bos:
            tokens[0] = vocab.BOS
            modality[0] = Modality.SPECIAL
        if cfg.eos:
            tokens[-1] = vocab.EOS
            modality[-1] = Modality.SPECIAL
        return ByteStream(tokens, np.ones(L, dtype=np.float32), modality, id=str(sample.get("id", "")))

    def decode(self, stream: ByteStream) -> str:
        """The text (TEXT-modality bytes decoded as UTF-8; a character split by truncation shows U+FFFD)."""
        return stream.data_bytes(Modality.TEXT).decode("utf-8", errors="replace")
