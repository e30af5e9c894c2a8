"""The serializer interface: a pure, deterministic function from a raw sample to a ByteStream.

A raw sample is a dict. Keys used by the shipped serializers:
``id`` (str, names the sample in errors), ``text`` (str), ``image`` (PNG/JPEG/... file bytes),
``question`` (str), ``answer`` (str).

To add a serializer: subclass :class:`Serializer`, give it a nested ``Config(SerializerConfig)``,
decorate it with ``@SERIALIZERS.register("name")`` and implement ``serialize`` (and ``decode`` if the
stream can be turned back into the sample). Raise :class:`SerializationError` for bad input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omnibyte.config import Node
from omnibyte.errors import SerializationError
from omnibyte.registry import SERIALIZERS  # noqa: F401  (re-exported for serializer modules)
from omnibyte.stream import ByteStream
from omnibyte.vocab import Modality


@dataclass(frozen=True)
class SerializerConfig(Node):
    """Options every serializer understands."""


class Serializer:
    Config = SerializerConfig
    #: the modality of the bytes this serializer produces (QA produces several)
    modality: Modality = Modality.TEXT
    #: True for serializers that encode an image (usable as the ``image:`` part of ``qa``)
    is_image: bool = False

    def __init__(self, config: SerializerConfig | None = None):
        self.config = config if config is not None else self.Config()

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    # --- to implement -------------------------------------------------------------------------
    def serialize(self, sample: Mapping[str, Any]) -> ByteStream:
        raise NotImplementedError

    def decode(self, stream: ByteStream) -> Any:
        raise NotImplementedError(f"{self.name} cannot decode streams")

    def question_prompt(self, image: bytes, question: str, sample_id: str = "ask") -> ByteStream:
        """The generation prompt for ``question`` about an image file (``omnibyte ask``): question-answer
        serializers only."""
        raise NotImplementedError(f"the {self.name} serializer makes no question prompts")

    # --- shared -------------------------------------------------------------------------------
    def __call__(self, sample: Mapping[str, Any]) -> ByteStream:
        """Serialize, turning any failure into a SerializationError that names the sample."""
        sid = str(sample.get("id", "")) if isinstance(sample, Mapping) else ""
        try:
            stream = self.serialize(sample)
        except SerializationError:
            raise
        except Exception as e:  # decoder errors from Pillow, UnicodeDecodeError, ...
            raise SerializationError(sid, f"{type(e).__name__}: {e}", self.name) from e
        if stream.id != sid:
            stream = ByteStream(stream.tokens, stream.loss_mask, stream.modality, id=sid)
        return stream

    def fail(self, sample: Mapping[str, Any] | str, reason: str) -> SerializationError:
        sid = sample if isinstance(sample, str) else str(sample.get("id", ""))
        return SerializationError(sid, reason, self.name)
