"""``qa``: an image, a question and an answer as one stream (visual question answering).

Layout for the default ``order: [image, question, answer]``::

    BOS  SOM_IMAGE <image bytes> EOM  SOM_QUESTION <question UTF-8> EOM  SOM_ANSWER <answer UTF-8> EOS

``order`` lists the segments; ``image`` and ``question`` may appear any number of times (the paper's QIQA
option is ``[question, image, question, answer]``) and ``answer`` exactly once, last, closed by EOS
instead of EOM. The image bytes come from any image serializer (``image:`` node, default ``png``
passthrough); they hold IMAGE-modality bytes only. Marker tokens (BOS, EOS, EOM, SOM_*) have modality
SPECIAL; bytes have the modality of their segment (IMAGE, QUESTION, ANSWER).

Exact length, with ``n_image`` / ``n_question`` the number of such segments in ``order``:

    L = 1 + n_image * (2 + L_image) + n_question * (2 + len(utf8(question))) + 2 + len(utf8(answer)) + pads

where ``L_image`` is the image serializer's own length and ``pads`` is 0 unless ``image_align`` > 1.

``image_align`` (default 1: none): PAD tokens (modality SPECIAL, loss weight 0 under every policy) after each
SOM_IMAGE, as few as put the first image byte at a stream index that is a multiple of ``image_align``. With the
model's patch size (or a multiple of it), every image starts at a patch boundary: the pixel -> patch layout is the
same in every stream, where a question before the image would otherwise shift it by the question's length, and
with a patch of whole pixels (12 bytes = 4 RGB pixels) and rows of whole patches (32 pixels = 8 patches) each
global position holds the same pixels of the same row in every image. :meth:`QASerializer.prompt` stops after
SOM_ANSWER: ``L_prompt = L - len(utf8(answer)) - 1``.

Loss policy (``loss``):

* ``all``: weight 1 on every token;
* ``answer``: weight 1 on the answer bytes and the closing EOS, 0 elsewhere (the CLEVR VQA setup);
* ``weights``: per-modality float weights from ``weights`` (keys ``image``, ``question``, ``answer``,
  ``special``; a missing key means 1.0); the closing EOS takes the ``answer`` weight, every other marker
  the ``special`` weight. Fractional weights are kept as float32.

Question and answer must be non-empty after stripping whitespace (else SerializationError); the stored
bytes are the text exactly as given. ``prompt`` allows a missing answer (for generation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from omnibyte import vocab
from omnibyte.config import Node, poly
from omnibyte.errors import SerializationError
from omnibyte.stream import ByteStream
from omnibyte.vocab import Modality

from ._image import ImageError, image_bytes
from .base import SERIALIZERS, Serializer, SerializerConfig

Segment = Literal["image", "question", "answer"]
_WEIGHT_KEYS = ("special", "image", "question", "answer")


@SERIALIZERS.register("qa")
class QASerializer(Serializer):
    """Image + question + answer with markers, configurable segment order and loss policy."""

    @dataclass(frozen=True)
    class Config(SerializerConfig):
        image: Node = poly("serializers", default="png")  # any image serializer (png, jpeg, pixels)
        order: tuple[Segment, ...] = ("image", "question", "answer")  # answer exactly once, last
        loss: Literal["all", "answer", "weights"] = "answer"
        weights: dict[str, float] = field(default_factory=dict)  # loss=weights: special/image/question/answer
        question_field: str = "question"
        answer_field: str = "answer"
        image_align: int = 1  # PADs after SOM_IMAGE so image bytes start at a multiple of this (1: none)

        def __post_init__(self) -> None:
            if self.image is None:  # built directly in Python rather than from a dict
                object.__setattr__(self, "image", SERIALIZERS.get("png").Config(name="png"))
            cls = SERIALIZERS.get(self.image.name)
            if not getattr(cls, "is_image", False):
                raise ValueError(f"image: serializer {self.image.name!r} is not an image serializer "
                                 f"(image serializers: {', '.join(n for n in SERIALIZERS.names() if getattr(SERIALIZERS.get(n), 'is_image', False))})")
            if self.order.count("answer") != 1 or self.order[-1] != "answer":
                raise ValueError(f"order must contain 'answer' exactly once, as the last segment; got {list(self.order)}")
            if isinstance(self.image_align, bool) or not isinstance(self.image_align, int) or self.image_align < 1:
                raise ValueError(f"image_align must be a whole number >= 1, got {self.image_align!r}")
            for k, w in self.weights.items():
                if k not in _WEIGHT_KEYS:
                    raise ValueError(f"weights: unknown key {k!r} (one of {', '.join(_WEIGHT_KEYS)})")
                if not math.isfinite(w) or w < 0:
                    raise ValueError(f"weights.{k} must be finite and >= 0, got {w}")

    modality = Modality.ANSWER

    def __init__(self, config: Config | None = None):
        super().__init__(config)
        self.image = SERIALIZERS.build(self.config.image)
        w = {k: float(self.config.weights.get(k, 1.0)) for k in _WEIGHT_KEYS}
        self._weight_by_modality = np.zeros(max(Modality) + 1, dtype=np.float32)
        for k in _WEIGHT_KEYS:
            self._weight_by_modality[Modality[k.upper()]] = w[k]
        self._eos_weight = w["answer"]

    # ------------------------------------------------------------------------------------------
    def serialize(self, sample: Mapping[str, Any]) -> ByteStream:
        return self._build(sample, with_answer=True)

    def prompt(self, sample: Mapping[str, Any]) -> ByteStream:
        """Everything up to and including SOM_ANSWER (the answer, if any, is ignored): the generation prompt."""
        return self._build(sample, with_answer=False)

    def question_prompt(self, image: bytes, question: str, sample_id: str = "ask") -> ByteStream:
        """:meth:`prompt` for a sample of one image file and one question, in this serializer's field names."""
        return self.prompt({"id": sample_id, self.image.config.field: image, self.config.question_field: question})

    def answer_tokens(self, answer: str) -> list[int]:
        """The target continuation of a prompt: answer UTF-8 bytes, then EOS."""
        return [*self._text(answer, "answer", ""), vocab.EOS]

    def decode(self, stream: ByteStream) -> dict[str, Any]:
        """Back to ``dict(image=bytes, question=str, answer=str)`` (first segment of each kind; a prompt
        without EOS decodes its answer as ``""``)."""
        t = stream.tokens
        out: dict[str, Any] = {}
        i, n = 0, len(t)
        starts = {vocab.SOM_IMAGE: "image", vocab.SOM_QUESTION: "question", vocab.SOM_ANSWER: "answer"}
        while i < n:
            kind = starts.get(int(t[i]))
            if kind is None:
                i += 1
                continue
            j = i + 1
            while kind == "image" and j < n and t[j] == vocab.PAD:  # image_align's PADs
                j += 1
            first = j  # the segment's bytes start after the marker (and its PADs)
            while j < n and t[j] < vocab.NUM_BYTES:
                j += 1
            closer = int(t[j]) if j < n else None
            if kind != "answer" and closer != vocab.EOM:
                raise ValueError(f"stream {stream.id!r}: {kind} segment at {i} is not closed by EOM")
            if kind == "answer" and closer not in (vocab.EOS, None):
                raise ValueError(f"stream {stream.id!r}: answer segment at {i} is not closed by EOS")
            out.setdefault(kind, t[first:j].astype(np.uint8).tobytes())
            i = j + 1
        result = {"image": out.get("image", b"")}
        for k in ("question", "answer"):
            result[k] = out.get(k, b"").decode("utf-8", errors="replace")
        return result

    # ------------------------------------------------------------------------------------------
    def _text(self, value: Any, what: str, sid: str) -> bytes:
        if isinstance(value, str):
            try:
                b = value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise SerializationError(sid, f"{what} is not encodable as UTF-8: {e.reason}", self.name) from None
        elif isinstance(value, (bytes, bytearray)):
            b = bytes(value)
            try:
                b.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SerializationError(sid, f"{what} is not valid UTF-8 at byte {e.start}", self.name) from None
        else:
            raise SerializationError(sid, f"{what} must be a string, got {type(value).__name__}", self.name)
        if not b.strip():
            raise SerializationError(sid, f"empty {what}", self.name)
        return b

    def _build(self, sample: Mapping[str, Any], with_answer: bool) -> ByteStream:
        cfg = self.config
        sid = str(sample.get("id", ""))
        q_key, a_key = cfg.question_field, cfg.answer_field
        if "question" in cfg.order and q_key not in sample:
            raise SerializationError(sid, f"sample has no {q_key!r} field", self.name)
        if with_answer and a_key not in sample:
            raise SerializationError(sid, f"sample has no {a_key!r} field (use prompt() for generation)", self.name)
        question = self._text(sample[q_key], "question", sid) if "question" in cfg.order else b""
        answer = self._text(sample[a_key], "answer", sid) if with_answer else b""
        img_tokens = None
        if "image" in cfg.order:
            try:
                data = image_bytes(sample, self.image.config.field)
            except ImageError as e:
                raise SerializationError(sid, str(e), self.name) from None
            payload = self.image.image_payload(data, sid)
            img_tokens = payload if isinstance(payload, np.ndarray) else np.frombuffer(payload, np.uint8)

        # one pass to place every segment; tokens and modality filled in place
        pieces: list[tuple[np.ndarray | bytes | None, int, int]] = [(None, vocab.BOS, 0)]  # (payload, marker, mod)
        pads = 0
        for seg in cfg.order:
            if seg == "image":
                pieces.append((None, vocab.SOM_IMAGE, 0))
                if cfg.image_align > 1:  # PADs up to the next multiple of image_align
                    k = -sum(1 if p is None else len(p) for p, _, _ in pieces) % cfg.image_align
                    pieces += [(None, vocab.PAD, 0)] * k
                    pads += k
                pieces += [(img_tokens, 0, Modality.IMAGE), (None, vocab.EOM, 0)]
            elif seg == "question":
                pieces += [(None, vocab.SOM_QUESTION, 0), (question, 0, Modality.QUESTION), (None, vocab.EOM, 0)]
            else:
                pieces.append((None, vocab.SOM_ANSWER, 0))
                if with_answer:
                    pieces += [(answer, 0, Modality.ANSWER), (None, vocab.EOS, 0)]
        L = sum(1 if p is None else len(p) for p, _, _ in pieces)
        tokens = np.empty(L, dtype=np.uint16)
        modality = np.zeros(L, dtype=np.uint8)
        pos = 0
        for payload, marker, mod in pieces:
            if payload is None:
                tokens[pos] = marker
                pos += 1
                continue
            k = len(payload)
            tokens[pos:pos + k] = payload if isinstance(payload, np.ndarray) else np.frombuffer(payload, np.uint8)
            modality[pos:pos + k] = mod
            pos += k

        if cfg.loss == "all":
            loss = np.ones(L, dtype=np.float32)
        elif cfg.loss == "answer":  # the answer is last: its bytes and the closing EOS
            loss = np.zeros(L, dtype=np.float32)
            if with_answer:
                loss[L - len(answer) - 1:] = 1.0
        else:
            loss = self._weight_by_modality[modality]
            if with_answer:
                loss[-1] = self._eos_weight
        if pads:  # alignment PADs are never predicted (loss=all / weights would weigh them as specials)
            loss = np.where(tokens == vocab.PAD, np.float32(0), loss).astype(np.float32)
        return ByteStream(tokens, loss, modality, id=sid)
