"""Look at a serialized sample: a text summary (length, spans, hex/ASCII head) and a picture of the stream.

Used by ``omnibyte inspect``; works on any :class:`~omnibyte.stream.ByteStream` and serializer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import vocab
from .stream import ByteStream
from .vocab import Modality

# one colour per modality (SPECIAL, TEXT, IMAGE, QUESTION, ANSWER)
COLORS = {
    Modality.SPECIAL: "#d62728",
    Modality.TEXT: "#1f77b4",
    Modality.IMAGE: "#7f7f7f",
    Modality.QUESTION: "#2ca02c",
    Modality.ANSWER: "#ff7f0e",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


# ----------------------------------------------------------------------------------------------
# samples from files


def load_sample(path: str | Path) -> dict[str, Any]:
    """A raw sample from a file: image file -> {"image"}, .txt -> {"text"}, .json -> its fields, with
    ``"image"`` a path relative to the JSON file (read as bytes). ``id`` defaults to the file stem."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            sample = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(sample, dict):
            raise ValueError(f"{path}: a sample JSON must be an object, got {type(sample).__name__}")
        if isinstance(sample.get("image"), str):
            img = (path.parent / sample["image"]).resolve()
            if not img.is_file():
                raise FileNotFoundError(f"{path}: image {sample['image']!r} not found (looked at {img})")
            sample["image"] = img.read_bytes()
        sample.setdefault("id", path.stem)
        return sample
    data = path.read_bytes()
    if suffix in IMAGE_SUFFIXES:
        return {"id": path.name, "image": data}
    try:
        text: str | bytes = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data  # let the serializer's errors policy decide
    return {"id": path.name, "text": text}


# ----------------------------------------------------------------------------------------------
# text summary


def _printable(b: int) -> str:
    return chr(b) if 32 <= b < 127 else "."


def hexdump(tokens: np.ndarray, start: int = 0, width: int = 16) -> list[str]:
    """Hex/ASCII lines; specials get a line of their own, by name."""
    lines: list[str] = []
    row: list[int] = []
    row_start = start

    def flush() -> None:
        if row:
            hexes = " ".join(f"{b:02x}" for b in row)
            lines.append(f"{row_start:>8}  {hexes:<{3 * width - 1}}  |{''.join(_printable(b) for b in row)}|")

    for i, t in enumerate(tokens.tolist()):
        if t >= vocab.NUM_BYTES:
            flush()
            row = []
            lines.append(f"{start + i:>8}  <{vocab.token_name(t)}>")
            row_start = start + i + 1
            continue
        if not row:
            row_start = start + i
        row.append(t)
        if len(row) == width:
            flush()
            row = []
    flush()
    return lines


def _preview(stream: ByteStream, mod: Modality, s: int, e: int, limit: int = 40) -> str:
    toks = stream.tokens[s:e]
    if mod == Modality.SPECIAL or (toks >= vocab.NUM_BYTES).all():
        names = [vocab.token_name(int(t)) for t in toks[:8]]
        return " ".join(names) + (" ..." if e - s > 8 else "")
    data = toks[toks < vocab.NUM_BYTES].astype(np.uint8).tobytes()
    if mod in (Modality.TEXT, Modality.QUESTION, Modality.ANSWER):
        text = data[:limit].decode("utf-8", errors="replace")
        return repr(text) + (" ..." if len(data) > limit else "")
    head = data[:12]
    return " ".join(f"{b:02x}" for b in head) + f"  |{''.join(_printable(b) for b in head)}|" + \
        (" ..." if len(data) > 12 else "")


def summary(stream: ByteStream, serializer: Any = None, head: int = 64) -> str:
    """Length, per-modality totals, the spans with a preview each, and a hex/ASCII head."""
    n = len(stream)
    out = []
    who = f" [{serializer.name}]" if serializer is not None else ""
    out.append(f"sample {stream.id!r}{who}: {n} tokens, loss weight sum {float(stream.loss_mask.sum()):g} "
               f"over {int((stream.loss_mask > 0).sum())} tokens")
    specials_in_bytes = int(((stream.tokens >= vocab.NUM_BYTES) & (stream.modality != Modality.SPECIAL)).sum())
    if specials_in_bytes:
        out.append(f"  WARNING: {specials_in_bytes} special tokens outside SPECIAL modality")
    out.append("per modality:")
    for m in Modality:
        sel = stream.modality == int(m)
        k = int(sel.sum())
        if k:
            out.append(f"  {m.name.lower():<9} {k:>8} tokens  loss weight {float(stream.loss_mask[sel].sum()):g}")
    spans = stream.spans()
    out.append(f"spans ({len(spans)}):")
    for m, s, e in spans[:40]:
        w = stream.loss_mask[s:e]
        lw = f"{float(w[0]):g}" if (w == w[0]).all() else f"{float(w.min()):g}..{float(w.max()):g}"
        out.append(f"  {m.name.lower():<9} [{s:>7}, {e:>7})  {e - s:>7}  loss {lw:<6} {_preview(stream, m, s, e)}")
    if len(spans) > 40:
        out.append(f"  ... {len(spans) - 40} more spans")
    k = min(head, n)
    out.append(f"head (first {k} of {n} tokens):")
    out.extend(hexdump(stream.tokens[:k]))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# picture


def _image_part(stream: ByteStream, serializer: Any):
    """(image serializer, IMAGE-only sub-stream) if the stream holds an image, else (None, None)."""
    ser = serializer
    if ser is not None and not getattr(ser, "is_image", False):
        ser = getattr(ser, "image", None)  # qa composes one
    if ser is None or not getattr(ser, "is_image", False):
        return None, None
    spans = [(s, e) for m, s, e in stream.spans() if m == Modality.IMAGE]
    if not spans:
        return None, None
    s, e = spans[0]
    return ser, stream[s:e]


def _structure_view(stream: ByteStream, keep: int = 6, max_cells: int = 120) -> list[int | None]:
    """Token positions to show in the zoomed strip: every non-image token, and the first/last ``keep`` of
    each long image span (``None`` marks an ellipsis)."""
    idx: list[int | None] = []
    for m, s, e in stream.spans():
        if m == Modality.IMAGE and e - s > 2 * keep + 1:
            idx += list(range(s, s + keep)) + [None] + list(range(e - keep, e))
        else:
            idx += list(range(s, e))
    if len(idx) > max_cells:
        idx = idx[:max_cells // 2] + [None] + idx[-max_cells // 2:]
    return idx


def plot(stream: ByteStream, serializer: Any, out: str | Path, title: str | None = None) -> Path:
    """Draw the stream to ``out`` (PNG): modality strip, byte values, loss weights, a zoomed structure view,
    and for image serializers the bytes as a 2-D map and the decoded image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = len(stream)
    img_ser, img_stream = _image_part(stream, serializer)
    has_img = img_ser is not None and len(img_stream) > 0
    fig = plt.figure(figsize=(13, 9.5 if has_img else 5.5), dpi=110)
    gs = fig.add_gridspec(5 if has_img else 4, 2, height_ratios=[0.5, 0.5, 0.35, 1.3] + ([5] if has_img else []),
                          hspace=0.9, wspace=0.12)
    cmap = ListedColormap([COLORS[m] for m in Modality])
    ext = [0, max(n, 1), 0, 1]

    ax = fig.add_subplot(gs[0, :])
    ax.imshow(stream.modality[None, :], aspect="auto", cmap=cmap, vmin=0, vmax=len(Modality) - 1,
              interpolation="nearest", extent=ext)
    ax.set_yticks([])
    ax.set_title(f"modality of each token (length {n})", fontsize=10, loc="left")
    present = [m for m in Modality if (stream.modality == int(m)).any()]
    ax.legend(handles=[Patch(color=COLORS[m], label=m.name.lower()) for m in present], loc="upper right",
              bbox_to_anchor=(1.0, 2.1), ncol=len(present), fontsize=8, frameon=False)

    ax = fig.add_subplot(gs[1, :])
    vals = np.where(stream.tokens < vocab.NUM_BYTES, stream.tokens, 0).astype(np.float32)
    ax.imshow(vals[None, :], aspect="auto", cmap="gray", vmin=0, vmax=255, interpolation="nearest", extent=ext)
    sp = np.flatnonzero(stream.tokens >= vocab.NUM_BYTES)
    ax.vlines(sp + 0.5, 0, 1, colors=COLORS[Modality.SPECIAL], linewidth=0.8)
    ax.set_yticks([])
    ax.set_title("byte values 0x00 (black) .. 0xff (white); special tokens as red lines", fontsize=10, loc="left")

    ax = fig.add_subplot(gs[2, :])
    ax.imshow(stream.loss_mask[None, :], aspect="auto", cmap="Oranges", vmin=0,
              vmax=max(1.0, float(stream.loss_mask.max()) if n else 1.0), interpolation="nearest", extent=ext)
    weighted = np.flatnonzero(stream.loss_mask > 0)
    if 0 < len(weighted) < 500 and n > 1000:  # too thin to see at this scale: mark them
        ax.vlines(weighted + 0.5, 0, 1, colors="#d94801", linewidth=1.2)
    ax.set_yticks([])
    where = f", at {weighted[0]}..{weighted[-1]}" if 0 < len(weighted) < 500 else ""
    ax.set_title(f"loss weight (sum {float(stream.loss_mask.sum()):g} over {len(weighted)} tokens{where})",
                 fontsize=10, loc="left")

    # zoomed structure view: one cell per token, labelled
    ax = fig.add_subplot(gs[3, :])
    idx = _structure_view(stream)
    for x, i in enumerate(idx):
        if i is None:
            ax.text(x + 0.5, 0.5, "…", ha="center", va="center", fontsize=9)
            continue
        t, m = int(stream.tokens[i]), Modality(int(stream.modality[i]))
        ax.add_patch(plt.Rectangle((x, 0), 1, 1, color=COLORS[m], alpha=0.85 if stream.loss_mask[i] > 0 else 0.35))
        if t >= vocab.NUM_BYTES:
            ax.text(x + 0.5, 0.5, vocab.token_name(t), rotation=90, ha="center", va="center", fontsize=6.5,
                    color="white", fontweight="bold")
        else:
            label = ("\u2423" if t == 32 else chr(t)) if 32 <= t < 127 and m != Modality.IMAGE else f"{t:02x}"
            ax.text(x + 0.5, 0.5, label, ha="center", va="center", fontsize=7 if len(label) == 1 else 5.5,
                    rotation=0 if len(label) == 1 else 90)
    ax.set_xlim(0, max(len(idx), 1))
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xticks([])
    ax.set_title("structure (long image spans elided; pale = loss weight 0)", fontsize=10, loc="left")

    if has_img:
        data = img_stream.data_bytes()
        ax = fig.add_subplot(gs[4, 0])
        name = getattr(img_ser, "name", "image")
        img = None
        try:
            img = img_ser.decode_image(img_stream)
        except Exception as e:  # a plot still helps when decoding fails
            img_err = f"{type(e).__name__}: {e}"
        if name == "pixels" and img is not None:
            arr = np.frombuffer(data, dtype=np.uint8)
            width = img.size[0] * (3 if img.mode == "RGB" else 1)
            cfg = img_ser.config
            head = 5 if cfg.header else 0
            body = arr[head:]
            w = (cfg.patch * cfg.patch * (3 if cfg.mode == "RGB" else 1)) if cfg.order == "patch" else width
            rows = body[: (len(body) // w) * w].reshape(-1, w)
            ax.imshow(rows, cmap="viridis", aspect="auto", interpolation="nearest",
                      vmin=0, vmax=(1 << cfg.bits) - 1)
            ax.set_title(f"stream bytes, {'one patch' if cfg.order == 'patch' else 'one image row'} per line "
                         f"({rows.shape[0]} x {w})", fontsize=10, loc="left")
        else:
            arr = np.frombuffer(data, dtype=np.uint8)
            w = max(1, int(math.ceil(math.sqrt(len(arr) * 1.5))))
            pad = np.full(w * math.ceil(len(arr) / w), np.nan, dtype=np.float32)
            pad[: len(arr)] = arr
            ax.imshow(pad.reshape(-1, w), cmap="viridis", aspect="auto", interpolation="nearest", vmin=0, vmax=255)
            ax.set_title(f"{name} file bytes as a {pad.size // w} x {w} map (byte value)", fontsize=10, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
        ax = fig.add_subplot(gs[4, 1])
        if img is not None:
            ax.imshow(img, cmap="gray" if img.mode == "L" else None, interpolation="nearest")
            ax.set_title(f"decoded image ({img.size[0]} x {img.size[1]} {img.mode}, {len(data)} bytes)",
                         fontsize=10, loc="left")
        else:
            ax.text(0.5, 0.5, f"cannot decode:\n{img_err}", ha="center", va="center", wrap=True)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"{stream.id}  [{getattr(serializer, 'name', '')}]", fontsize=12, x=0.01, ha="left")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def texts(sample: Mapping[str, Any]) -> str:
    """Short description of the sample's text fields (for the CLI header)."""
    parts = [f"{k}={v!r}" for k, v in sample.items() if isinstance(v, str) and k != "id"]
    return ", ".join(p if len(p) < 80 else p[:77] + "...'" for p in parts)
