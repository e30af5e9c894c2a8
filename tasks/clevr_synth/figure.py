"""The README figure: generated scenes beside real CLEVR renders.

    python -m omnibyte.tasks.clevr_synth.figure --real ../shared/data/clevr-gen/sample-images \
        --out docs/images/clevr_synth_vs_real.png

Generated scenes are rendered at the real renders' size (320x240). Real renders: CLEVR (Johnson et al.
2017), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .render import render
from .scene import sample_scene


def make_figure(real_paths: list[Path], out: Path, rows: int = 2, generated_cols: int = 3,
                size: tuple[int, int] = (320, 240), seed: str = "figure") -> Path:
    w, h = size
    gap, head = 6, 28
    cols = generated_cols + 1
    W = cols * w + (cols - 1) * gap + 2 * gap  # an extra gap separates real from generated
    H = head + rows * h + (rows - 1) * gap
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    for r in range(rows):
        for c in range(generated_cols):
            scene = sample_scene(random.Random(f"{seed}-{r * generated_cols + c}"), w / h)
            canvas.paste(Image.fromarray(render(scene, w, h)), (c * (w + gap), head + r * (h + gap)))
        real = Image.open(real_paths[r % len(real_paths)]).convert("RGB").resize((w, h), Image.BICUBIC)
        canvas.paste(real, (generated_cols * (w + gap) + 2 * gap, head + r * (h + gap)))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text((4, 4), "generated: omnibyte prepare clevr-synth (numpy renderer, no Blender)", fill=(0, 0, 0), font=font)
    draw.text((generated_cols * (w + gap) + 2 * gap + 4, 4), "real CLEVR (Blender)", fill=(0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG", optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", required=True, help="directory of real CLEVR renders (PNG)")
    ap.add_argument("--out", default="docs/images/clevr_synth_vs_real.png")
    ap.add_argument("--pick", default="img2.png,img4.png", help="real renders to show, comma-separated")
    args = ap.parse_args(argv)
    real = [Path(args.real) / n for n in args.pick.split(",")]
    print(make_figure(real, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

