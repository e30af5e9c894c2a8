"""Throughput of the offline CLEVR generator on one core: scene sampling + rendering + PNG encoding.

Prints one JSON line. ``images_per_s`` counts CPU time of this single process (so a busy machine does
not distort it); ``wall_images_per_s`` is the wall-clock rate. Question generation is reported apart
(``questions_ms_per_image``, 10 questions per image, our templates).

    python benchmarks/clevr_render.py [--n 50] [--size 480x320]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from omnibyte.tasks.clevr_synth.generate import PNG_COMPRESS_LEVEL  # noqa: E402
from omnibyte.tasks.clevr_synth.questions import QuestionGenerator  # noqa: E402
from omnibyte.tasks.clevr_synth.render import render  # noqa: E402
from omnibyte.tasks.clevr_synth.scene import sample_scene  # noqa: E402
from omnibyte.tasks.clevr_synth.templates import load_templates  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--size", default="480x320")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    # warm-up (imports, LUTs)
    render(sample_scene(random.Random("warm"), w / h), w, h)
    t_sample = t_render = t_png = 0.0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    scenes = []
    for i in range(args.n):
        c = time.process_time()
        scene = sample_scene(random.Random(f"bench/{i}"), w / h)
        c1 = time.process_time()
        rgb = render(scene, w, h)
        c2 = time.process_time()
        rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], -1)
        Image.fromarray(rgba, "RGBA").save(io.BytesIO(), format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        c3 = time.process_time()
        t_sample, t_render, t_png = t_sample + c1 - c, t_render + c2 - c1, t_png + c3 - c2
        scenes.append(scene)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0

    qgen = QuestionGenerator(load_templates(), "bench/q")
    c = time.process_time()
    for s in scenes:
        qgen.questions_for(s, 10)
    t_q = time.process_time() - c

    print(json.dumps({
        "benchmark": "clevr_render", "images_per_s": round(args.n / cpu, 2), "size": f"{w}x{h}", "cores": 1,
        "n": args.n, "wall_images_per_s": round(args.n / wall, 2),
        "ms_per_image": {"sample": round(1e3 * t_sample / args.n, 2), "render": round(1e3 * t_render / args.n, 2),
                         "png": round(1e3 * t_png / args.n, 2)},
        "questions_ms_per_image": round(1e3 * t_q / args.n, 2),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
