"""Corruptions for noise-robustness evaluation: text (before serialization), image files (before
serialization) and image bytes (after serialization).

A corruption is written ``NAME`` or ``NAME:VALUE`` (:func:`parse`). Every random draw comes from
:func:`rng_for` ``(seed, corruption, sample id)``: a sample gets the same corruption whatever order samples are
processed in, whatever other samples are evaluated, and independently of other corruptions.

**Text** (on the sample's text field: ``text`` for ``utf8`` runs, the question for ``qa`` runs), codepoint by
codepoint on the decoded string, so a multi-byte UTF-8 character is never split; the definitions follow ByT5
(Xue et al. 2022, "Synthetic noise"), which MambaByte and BLT evaluate with:

* ``drop:p`` -- each character is deleted with probability p.
* ``repeat:p`` -- each character is selected with probability p; a selected character is followed by 1, 2 or
  3 copies of itself (equally likely).
* ``swap:p`` -- left to right, a character not yet moved swaps places with the next one with probability p
  (so a character moves at most once; the expected share of characters that start a swap is p / (1 + p)).
* ``uppercase:p`` -- each character is replaced by its uppercase form with probability p (``str.upper``: one
  character may become several, e.g. ``ß`` -> ``SS``).
* ``antspeak`` -- the whole text uppercased, each non-whitespace character preceded by a space (whitespace kept
  as it is) and one space at the end: ``abc def`` -> `` A B C  D E F `` (ByT5's example).
* ``random_case`` -- each character is uppercased or lowercased, each with probability 1/2.

**Image files** (on the sample's image file bytes, before the image serializer): the file is decoded with
Pillow and written back **in its own format** (PNG stays PNG, JPEG stays JPEG), so a passthrough run reads
a valid file of the kind it was trained on:

* ``jpeg:Q`` -- JPEG compression at quality Q (1..95): a JPEG is re-encoded at Q; a PNG's colour channels
  go through a JPEG at Q and back (alpha kept) and the result is saved as PNG.
* ``noise:SIGMA`` -- Gaussian pixel noise of standard deviation SIGMA (0-255 intensity units) added to every
  colour sample (alpha untouched), rounded and clipped to 0..255. PNGs are saved losslessly (8-bit L, RGB or
  RGBA); JPEGs at quality 95, 4:4:4. ``noise:0`` is therefore the re-save alone (a control).
* ``blank`` -- every pixel set to the image's mean colour (per channel, rounded; alpha untouched), saved as
  ``noise`` saves: the same size and format with no scene left. A blind control: a VQA model that answers as
  well with ``blank`` as with the clean image answers from the question alone. With the ``pixels`` serializer
  the stream keeps its length and every byte its position.

**Image bytes** (after serialization, only on tokens < 256 whose modality track is IMAGE -- PNG/JPEG file
bytes or pixels; markers and other modalities are never touched):

* ``image_drop:p`` -- each image byte is deleted with probability p (its loss weight and modality with it).
* ``image_flip:p`` -- each image byte has one of its 8 bits (uniformly chosen) flipped with probability p.
* ``image_swap:p`` -- as ``swap:p`` over the image bytes; a swap never crosses the end of an image segment.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError
from ..errors import DataError
from ..exif import orientation
from ..stream import ByteStream
from ..vocab import NUM_BYTES, Modality

#: name -> (layer, parameter kind, one-line definition); parameter kinds: p (probability), quality, sigma, None
CORRUPTIONS: dict[str, tuple[str, str | None, str]] = {
    "drop": ("text", "p", "each character deleted with probability p"),
    "repeat": ("text", "p", "each character, with probability p, followed by 1-3 copies of itself"),
    "swap": ("text", "p", "a character not yet moved swaps with the next one with probability p"),
    "uppercase": ("text", "p", "each character uppercased with probability p"),
    "antspeak": ("text", None, "whole text uppercased, a space before each non-space character, one at the end"),
    "random_case": ("text", None, "each character upper- or lowercased with probability 1/2"),
    "jpeg": ("image_file", "quality", "image through JPEG at quality Q (1..95), saved in its own format"),
    "noise": ("image_file", "sigma", "Gaussian pixel noise of std SIGMA (0-255 units), saved in its own format"),
    "blank": ("image_file", None, "every pixel set to the image's mean colour (a blind control), in its own format"),
    "image_drop": ("image_bytes", "p", "each image byte (after serialization) deleted with probability p"),
    "image_flip": ("image_bytes", "p", "each image byte has one random bit flipped with probability p"),
    "image_swap": ("image_bytes", "p", "adjacent image bytes swapped as swap:p, within an image segment"),
}
TEXT = tuple(k for k, v in CORRUPTIONS.items() if v[0] == "text")
IMAGE = tuple(k for k, v in CORRUPTIONS.items() if v[0] != "text")
_FORMS = {"p": "NAME:p (0 <= p <= 1)", "quality": "NAME:Q (integer 1..95)", "sigma": "NAME:SIGMA (>= 0)",
          None: "NAME (no value)"}


def allowed_text() -> str:
    return ", ".join(f"{k}{'' if CORRUPTIONS[k][1] is None else ':' + CORRUPTIONS[k][1]}" for k in CORRUPTIONS)


@dataclass(frozen=True)
class Corruption:
    name: str
    value: float | None = None

    @property
    def layer(self) -> str:
        return CORRUPTIONS[self.name][0]

    @property
    def label(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value:g}"


def parse(spec: str) -> Corruption:
    """``drop:0.05`` -> Corruption("drop", 0.05); a bad name or value is a ConfigError naming the allowed ones."""
    name, sep, raw = str(spec).strip().partition(":")
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {spec!r}; allowed: {allowed_text()}")
    kind = CORRUPTIONS[name][1]
    if kind is None:
        if sep:
            raise ConfigError(f"corruption {spec!r}: {name} takes no value (write {name})")
        return Corruption(name)
    if not sep:
        raise ConfigError(f"corruption {spec!r}: {name} needs a value: {_FORMS[kind].replace('NAME', name)}")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"corruption {spec!r}: {raw!r} is not a number "
                          f"({_FORMS[kind].replace('NAME', name)})") from None
    ok = {"p": 0.0 <= value <= 1.0, "quality": value.is_integer() and 1 <= value <= 95,
          "sigma": 0.0 <= value < float("inf")}[kind]
    if not ok:
        raise ConfigError(f"corruption {spec!r}: value {raw} out of range; write "
                          f"{_FORMS[kind].replace('NAME', name)}")
    return Corruption(name, int(value) if kind == "quality" else value)


def rng_for(seed: int, corruption: Corruption, sample_id: str) -> np.random.Generator:
    """The generator of one (seed, corruption, sample): independent of every other sample and corruption."""
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    digest = hashlib.sha256(f"{corruption.label}\x00{sample_id}".encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, *words]))


# --- text ---------------------------------------------------------------------------------------------


def _swap_starts(draws: np.ndarray, p: float, can_swap: np.ndarray | None = None) -> list[int]:
    """Left to right: position i swaps with i + 1 when ``draws[i] < p`` (and ``can_swap[i]``), then both are
    skipped (a position moves at most once)."""
    out = []
    n = len(draws)
    hits = np.flatnonzero(draws[: max(0, n - 1)] < p)
    last = -2
    for i in hits.tolist():
        if i <= last + 1 or (can_swap is not None and not can_swap[i]):
            continue
        out.append(i)
        last = i
    return out


def corrupt_text(text: str, c: Corruption, rng: np.random.Generator) -> str:
    """``text`` corrupted by ``c`` (a text corruption; module docstring)."""
    if c.layer != "text":
        raise ConfigError(f"corruption {c.label!r} is not a text corruption (text: {', '.join(TEXT)})")
    if not isinstance(text, str):
        raise TypeError(f"text corruption needs str, got {type(text).__name__}")
    if c.name == "antspeak":
        return "".join(ch if ch.isspace() else " " + ch.upper() for ch in text) + " "
    chars = list(text)
    n = len(chars)
    draws = rng.random(n)
    p = float(c.value) if c.value is not None else 0.5
    if c.name == "drop":
        return "".join(ch for ch, r in zip(chars, draws) if r >= p)
    if c.name == "repeat":
        copies = rng.integers(1, 4, n)
        return "".join(ch * (1 + int(k)) if r < p else ch for ch, r, k in zip(chars, draws, copies))
    if c.name == "swap":
        for i in _swap_starts(draws, p):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        return "".join(chars)
    if c.name == "uppercase":
        return "".join(ch.upper() if r < p else ch for ch, r in zip(chars, draws))
    if c.name == "random_case":
        return "".join(ch.upper() if r < 0.5 else ch.lower() for ch, r in zip(chars, draws))
    raise AssertionError(c.name)


# --- image files --------------------------------------------------------------------------------------


def corrupt_image_file(data: bytes, c: Corruption, rng: np.random.Generator, sample_id: str = "") -> bytes:
    """Image file bytes corrupted by ``c`` (``jpeg`` / ``noise``) and written back in the file's own format."""
    from PIL import Image

    if c.layer != "image_file":
        raise ConfigError(f"corruption {c.label!r} is not an image-file corruption (jpeg:Q, noise:SIGMA, blank)")
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        fmt = img.format
        img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure names the sample
        raise DataError(f"sample {sample_id!r}: corruption {c.label}: cannot decode the image file ({e})") from None
    if fmt not in ("PNG", "JPEG"):
        raise DataError(f"sample {sample_id!r}: corruption {c.label}: image format {fmt} (PNG or JPEG expected)")
    # EXIF orientation read as the serializers read it; a turned file is written back as displayed, without the
    # tag (the serializers turn the clean file too)
    if orientation(img) != 1:
        from PIL import ImageOps

        img = ImageOps.exif_transpose(img)
    if img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA"):  # e.g. 16-bit PNG (I;16): an 8-bit save clamps it
        raise DataError(f"sample {sample_id!r}: corruption {c.label}: image mode {img.mode} (8-bit 1 / L / LA / P / "
                        f"RGB / RGBA images only; re-saving {img.mode} as 8 bits would destroy it, not corrupt it)")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    grey = img.mode in ("L", "LA", "1")
    base = img.convert("LA" if grey and has_alpha else "L" if grey else "RGBA" if has_alpha else "RGB")
    colour = base.convert("L" if grey else "RGB")
    alpha = base.getchannel("A") if has_alpha else None
    if c.name == "jpeg":
        q = int(c.value)
        buf = io.BytesIO()
        colour.save(buf, format="JPEG", quality=q)
        if fmt == "JPEG":
            return buf.getvalue()
        colour = Image.open(io.BytesIO(buf.getvalue()))
        colour.load()
        colour = colour.convert("L" if grey else "RGB")
    elif c.name == "blank":
        arr = np.asarray(colour, dtype=np.float64)
        mean = np.rint(arr.reshape(-1, 1 if grey else 3).mean(0)).astype(np.uint8)
        colour = Image.fromarray(np.broadcast_to(mean, arr.shape).copy(),
                                 mode="L" if grey else "RGB")
    else:  # noise
        arr = np.asarray(colour, dtype=np.float64)
        arr = np.clip(np.rint(arr + rng.normal(0.0, float(c.value), arr.shape)), 0, 255).astype(np.uint8)
        colour = Image.fromarray(arr, mode="L" if grey else "RGB")
    out = io.BytesIO()
    if fmt == "JPEG":
        colour.save(out, format="JPEG", quality=95, subsampling=0)
    else:
        if alpha is not None:
            colour.putalpha(alpha)
        colour.save(out, format="PNG", compress_level=6)
    return out.getvalue()


# --- image bytes in a serialized stream ---------------------------------------------------------------


def image_positions(stream: ByteStream) -> np.ndarray:
    """Positions of the stream's image bytes: modality IMAGE and a byte id (< 256)."""
    return np.flatnonzero((stream.modality == int(Modality.IMAGE)) & (stream.tokens < NUM_BYTES))


def corrupt_stream(stream: ByteStream, c: Corruption, rng: np.random.Generator) -> ByteStream:
    """``stream`` with its image bytes corrupted by ``c`` (``image_drop`` / ``image_flip`` / ``image_swap``)."""
    if c.layer != "image_bytes":
        raise ConfigError(f"corruption {c.label!r} is not an image-byte corruption "
                          f"(image_drop:p, image_flip:p, image_swap:p)")
    pos = image_positions(stream)
    p = float(c.value)
    draws = rng.random(len(pos))
    if c.name == "image_drop":
        keep = np.ones(len(stream), dtype=bool)
        keep[pos[draws < p]] = False
        return ByteStream(stream.tokens[keep], stream.loss_mask[keep], stream.modality[keep], id=stream.id)
    tokens = stream.tokens.copy()
    if c.name == "image_flip":
        bits = rng.integers(0, 8, len(pos))
        hit = draws < p
        tokens[pos[hit]] ^= (np.uint16(1) << bits[hit].astype(np.uint16))
    else:  # image_swap: only neighbours in the same image segment
        adjacent = np.zeros(len(pos), dtype=bool)
        adjacent[:-1] = np.diff(pos) == 1
        for i in _swap_starts(draws, p, adjacent):
            a, b = pos[i], pos[i + 1]
            tokens[a], tokens[b] = tokens[b], tokens[a]
    return ByteStream(tokens, stream.loss_mask, stream.modality, id=stream.id)


__all__ = ["CORRUPTIONS", "TEXT", "IMAGE", "Corruption", "parse", "rng_for", "corrupt_text",
           "corrupt_image_file", "corrupt_stream", "image_positions", "allowed_text"]
