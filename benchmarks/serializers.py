"""Serializer throughput on one CPU core: samples/s and MB/s per serializer, one JSON line each.

    python benchmarks/serializers.py [--rounds 7] [--seconds 0.4] [--only qa*] [--out results.jsonl]

Input: 480x320 CLEVR-like RGBA PNGs (CLEVR v1.0's size and mode). They are made from the real 320x240
renders in ``../shared/data/clevr-gen/sample-images`` (upscaled 1.5x with bicubic resampling to 480x360,
centre-cropped to 480x320, written by Pillow at zlib level 6, all alpha 255 as in CLEVR); without that
folder a synthetic CLEVR-like scene (grey floor gradient, shaded discs, sensor noise) is drawn instead.
The samples cycle over the 8 images. utf8 is measured on 4 KiB UTF-8 text chunks (PG19 mini if present).
A JPEG copy (quality 90, 4:2:0) of each PNG feeds the JPEG passthrough row.

One core: the process pins itself to one CPU (``os.sched_setaffinity``) and sets torch, OpenMP and BLAS to
one thread before importing them; Pillow, numpy, zlib and libspng run single-threaded anyway.

Timing: after a warm-up, ``rounds`` rounds of about ``seconds`` each. ``samples_per_s`` is samples per
second of the pinned process's CPU time (``time.process_time``) in its best round (timeit's convention:
the fastest round is the least disturbed). On an idle core CPU time equals wall time; on a shared machine
it leaves out the time the process waited for its core, which is what "on one core" means here.
``samples_per_s_wall`` (best round) and the medians are reported beside it, so a reader can see how busy
the machine was. ``mb_per_s`` counts the sample's input bytes (image file + text) consumed per second of
CPU time; ``out_tokens`` is the stream length of one sample.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

CASES: list[tuple[str, dict]] = [
    ("png:passthrough", {"name": "png"}),
    ("png:reencode-62x41", {"name": "png", "method": "reencode", "size": [62, 41], "crop": 0.1}),
    ("jpeg:passthrough", {"name": "jpeg"}),
    ("jpeg:reencode-62x41", {"name": "jpeg", "method": "reencode", "size": [62, 41], "crop": 0.1}),
    ("pixels:62x41-patch8", {"name": "pixels", "size": [62, 41], "crop": 0.1, "order": "patch", "patch": 8}),
    ("utf8:4KiB", {"name": "utf8", "bos": True, "eos": True}),
    ("qa:png-passthrough", {"name": "qa"}),
    ("qa:png-reencode-62x41", {"name": "qa", "image": {"name": "png", "method": "reencode", "size": [62, 41],
                                                       "crop": 0.1}}),
    ("qa:png-reencode-62x41-level9", {"name": "qa", "image": {"name": "png", "method": "reencode", "size": [62, 41],
                                                             "crop": 0.1, "compress_level": 9}}),
    ("qa:png-reencode-62x41-rle", {"name": "qa", "image": {"name": "png", "method": "reencode", "size": [62, 41],
                                                           "crop": 0.1, "strategy": "rle"}}),
    ("qa:jpeg-reencode-62x41", {"name": "qa", "image": {"name": "jpeg", "method": "reencode", "size": [62, 41],
                                                        "crop": 0.1}}),
    ("qa:pixels-62x41", {"name": "qa", "image": {"name": "pixels", "size": [62, 41], "crop": 0.1}}),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to cpu {cpu} of {os.cpu_count()}"
    return "not pinned (no sched_setaffinity)"


def clevr_like_pngs(shared: Path = SHARED) -> tuple[list[bytes], str]:
    from PIL import Image

    out = []
    renders = shared / "clevr-gen" / "sample-images"
    files = sorted(renders.glob("*.png")) if renders.is_dir() else []
    for f in files:
        im = Image.open(f)
        im = im.resize((480, 360), Image.BICUBIC).crop((0, 20, 480, 340))
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=6)
        out.append(buf.getvalue())
    if out:
        return out, f"{len(out)} real CLEVR renders upscaled 1.5x to 480x360, centre-cropped to 480x320 RGBA"
    rng = np.random.default_rng(0)
    for _ in range(8):
        y, x = np.mgrid[0:320, 0:480]
        img = np.empty((320, 480, 4), np.float32)
        img[..., :3] = (90 + 60 * y / 320)[..., None]
        for _k in range(6):
            cx, cy, r = rng.uniform(40, 440), rng.uniform(120, 300), rng.uniform(15, 45)
            col = rng.uniform(30, 220, 3)
            d = ((x - cx) ** 2 + (y - cy) ** 2) / r**2
            shade = np.clip(1.2 - 0.5 * d, 0, 1)[..., None]
            img[..., :3] = np.where((d < 1)[..., None], col * shade, img[..., :3])
        img[..., :3] += rng.normal(0, 2.0, (320, 480, 3))
        img[..., 3] = 255
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGBA").save(buf, "PNG", compress_level=6)
        out.append(buf.getvalue())
    return out, "8 synthetic CLEVR-like 480x320 RGBA scenes (no ../shared data found)"


def texts(shared: Path = SHARED) -> tuple[list[str], str]:
    books = sorted((shared / "pg19-mini" / "train").glob("*.txt")) if shared.is_dir() else []
    if books:
        raw = books[0].read_bytes()[:64 * 4096]
        chunks = [raw[i:i + 4096].decode("utf-8", errors="ignore") for i in range(0, len(raw), 4096)]
        return chunks, f"64 chunks of 4 KiB of PG19-mini book {books[0].name}"
    rng = np.random.default_rng(0)
    words = ["the", "cube", "sphere", "is", "left", "of", "a", "large", "red", "metal", "cylinder"]
    return [" ".join(rng.choice(words, 800))[:4096] for _ in range(16)], "16 synthetic 4 KiB texts"


def measure(fn, samples: list, rounds: int, seconds: float) -> dict[str, float]:
    """Rates over ``rounds`` rounds of about ``seconds`` each, by process CPU time and by wall time."""
    k = len(samples)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds / 4 or n < 2 * k:  # warm-up, also sizes the rounds
        fn(samples[n % k])
        n += 1
    per = max(k, int(n / (time.perf_counter() - t0) * seconds))
    cpu, wall = [], []
    for _ in range(rounds):
        c, t = time.process_time(), time.perf_counter()
        for i in range(per):
            fn(samples[i % k])
        cpu.append(per / max(time.process_time() - c, 1e-9))
        wall.append(per / (time.perf_counter() - t))
    return {"cpu_best": max(cpu), "cpu_median": statistics.median(cpu), "wall_best": max(wall),
            "wall_median": statistics.median(wall), "per": per}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.4, help="length of one timed round")
    ap.add_argument("--only", default="*", help="glob over case names, e.g. 'qa*'")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--shared", type=Path, default=SHARED, help=f"the shared data folder (default {SHARED})")
    args = ap.parse_args(argv)

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    pinned = pin_one_core()
    import PIL
    import torch

    torch.set_num_threads(1)
    from PIL import Image

    from omnibyte.config import to_dict
    from omnibyte.registry import SERIALIZERS
    from omnibyte.serializers._image import _pyspng

    pngs, source = clevr_like_pngs(args.shared)
    jpegs = []
    for d in pngs:
        buf = io.BytesIO()
        Image.open(io.BytesIO(d)).convert("RGB").save(buf, "JPEG", quality=90, subsampling=2)
        jpegs.append(buf.getvalue())
    question, answer = "What color is the large rubber sphere in front of the gray cylinder?", "cyan"
    spng = _pyspng()
    common = {
        "device": "cpu", "cpu": cpu_name(), "threads": pinned,
        "python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
        "numpy": np.__version__, "pyspng": getattr(spng, "__version__", None) if spng else None,
        "input": source,
    }
    lines = []
    for case, node in CASES:
        if not fnmatch.fnmatchcase(case, args.only):
            continue
        ser = SERIALIZERS.build(node)
        name = node["name"]
        if name == "utf8":
            chunks, text_source = texts(args.shared)
            samples = [{"id": f"t{i}", "text": t} for i, t in enumerate(chunks)]
            nbytes = [len(s["text"].encode()) for s in samples]
        else:
            files = jpegs if case == "jpeg:passthrough" else pngs
            samples = [{"id": f"clevr{i}", "image": d, "question": question, "answer": answer}
                       for i, d in enumerate(files)]
            nbytes = [len(s["image"]) + (len(question) + len(answer) if name == "qa" else 0) for s in samples]
        out_tokens = len(ser(samples[0]))
        m = measure(ser, samples, args.rounds, args.seconds)
        rate = m["cpu_best"]
        rec = {
            "benchmark": "serializers", "serializer": case, "config": to_dict(ser.config),
            "samples_per_s": round(rate, 1), "mb_per_s": round(rate * float(np.mean(nbytes)) / 1e6, 2),
            "samples_per_s_median": round(m["cpu_median"], 1), "samples_per_s_wall": round(m["wall_best"], 1),
            "samples_per_s_wall_median": round(m["wall_median"], 1), "n": m["per"] * args.rounds,
            "rounds": args.rounds, "in_bytes": int(np.mean(nbytes)), "out_tokens": out_tokens, **common,
        }
        if name == "utf8":
            rec["input"] = text_source
        elif case == "jpeg:passthrough":
            rec["input"] = "JPEG copies (quality 90, 4:2:0) of: " + source
        line = json.dumps(rec)
        print(line, flush=True)
        lines.append(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
