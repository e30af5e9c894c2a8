"""The token contract: how bytes and special markers map to token ids.

* Ids ``0..255`` are the byte values themselves. Byte ``0x00`` is data, never padding.
* Special tokens start at 256: ``PAD``, ``BOS``, ``EOS``, ``EOM`` (end of modality) and one
  start-of-modality token per modality (``SOM_TEXT``, ``SOM_IMAGE``, ``SOM_QUESTION``, ``SOM_ANSWER``).
* The vocabulary size is rounded up to a multiple of 8 (tensor-core friendly); ids between the last
  special and ``VOCAB_SIZE`` are reserved and never produced.
* ``CONTRACT_VERSION`` is stored in every checkpoint and pre-serialized store; a model trained under
  one contract refuses streams written under another.

Streams are stored as ``uint16``; every id fits.
"""

from __future__ import annotations

import enum

CONTRACT_VERSION = 1
NUM_BYTES = 256


class Modality(enum.IntEnum):
    """Per-token modality code (stored as uint8 in a ByteStream)."""

    SPECIAL = 0  # BOS / EOS / EOM / SOM markers and PAD
    TEXT = 1
    IMAGE = 2
    QUESTION = 3
    ANSWER = 4

    @classmethod
    def parse(cls, value: str | int | Modality) -> Modality:
        if isinstance(value, Modality):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).upper()]
        except KeyError:
            names = ", ".join(m.name.lower() for m in cls)
            raise ValueError(f"unknown modality {value!r}; expected one of: {names}") from None


PAD = 256
BOS = 257
EOS = 258
EOM = 259
SOM = {
    Modality.TEXT: 260,
    Modality.IMAGE: 261,
    Modality.QUESTION: 262,
    Modality.ANSWER: 263,
}
SOM_TEXT = SOM[Modality.TEXT]
SOM_IMAGE = SOM[Modality.IMAGE]
SOM_QUESTION = SOM[Modality.QUESTION]
SOM_ANSWER = SOM[Modality.ANSWER]

SPECIAL_NAMES = {
    PAD: "PAD",
    BOS: "BOS",
    EOS: "EOS",
    EOM: "EOM",
    SOM_TEXT: "SOM_TEXT",
    SOM_IMAGE: "SOM_IMAGE",
    SOM_QUESTION: "SOM_QUESTION",
    SOM_ANSWER: "SOM_ANSWER",
}
NUM_SPECIALS = len(SPECIAL_NAMES)
VOCAB_SIZE = -(-(NUM_BYTES + NUM_SPECIALS) // 8) * 8  # 264


def is_special(token: int) -> bool:
    return token >= NUM_BYTES


def token_name(token: int) -> str:
    """Readable name: ``'0x41'`` for a byte, ``'BOS'`` for a special, ``'RESERVED_263'`` otherwise."""
    if 0 <= token < NUM_BYTES:
        return f"0x{token:02x}"
    return SPECIAL_NAMES.get(token, f"RESERVED_{token}")


def modality_name(code: int) -> str:
    """``"text"``, ``"image"``, ... for a modality code (the code itself as a string if unknown)."""
    try:
        return Modality(int(code)).name.lower()
    except ValueError:
        return str(code)


def check_contract(version: int, *, where: str = "") -> None:
    """Raise if data or a checkpoint was written under another token contract."""
    if int(version) != CONTRACT_VERSION:
        at = f" ({where})" if where else ""
        raise ValueError(
            f"token contract version {version}{at} does not match this omnibyte's version "
            f"{CONTRACT_VERSION}; re-serialize the data or use a matching omnibyte release"
        )
