#!/usr/bin/env python3
"""Does dropping pixel bytes hurt a CLEVR byte model through the image, or through the patch alignment of what
follows it? Removes k consecutive image bytes (at a position drawn per image file, seeded) from every eval
stream and scores VQA accuracy with ``omnibyte.run.evaluate_run``, for each k. With patches of P bytes, k = P
shifts the question by a whole patch (its alignment within patches unchanged), k = 1 by one byte.

    python results/robustness/drop_alignment.py RUN_DIR [--limit 300] [--k 0,1,4,8,16] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zlib
from pathlib import Path

import numpy as np


class DropRun:
    """The run's serializer, then ``k`` consecutive image bytes removed (every question about an image loses the
    same bytes, as with one damaged file)."""

    def __init__(self, inner, k: int, seed: int = 0):
        self.inner, self.k, self.seed = inner, k, seed
        self.config = inner.config

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, sample):
        from omnibyte.robustness.corruptions import image_positions
        from omnibyte.stream import ByteStream

        stream = self.inner(sample)
        if not self.k:
            return stream
        pos = image_positions(stream)
        if len(pos) <= self.k:
            raise ValueError(f"sample {sample.get('id')!r}: {len(pos)} image bytes, cannot drop {self.k}")
        key = str(sample.get("image_filename") or sample["id"])
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        start = int(rng.integers(0, len(pos) - self.k))
        keep = np.ones(len(stream), dtype=bool)
        keep[pos[start:start + self.k]] = False
        return ByteStream(stream.tokens[keep], stream.loss_mask[keep], stream.modality[keep], id=stream.id)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--k", default="0,1,4,8,16")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from omnibyte.run import evaluate_run, load_run

    run = load_run(a.run_dir)
    patch = run.model.stream_meta.patch_product
    rows = []
    for k in (int(x) for x in a.k.split(",")):
        variant = dataclasses.replace(run, serializer=DropRun(run.serializer, k))
        res = evaluate_run(variant, max_samples=a.limit, per_token=False, task_metrics=True, progress=False,
                           out_dir=Path(a.run_dir) / "eval" / "drop_alignment" / f"k{k}")
        task = res.get("task") or {}
        by = task.get(f"by_qtype_{task.get('main_mode')}") or {}
        rows.append({"k": k, "shift_mod_patch": k % patch, "accuracy": task.get("accuracy"), "by_qtype": by,
                     "answer_bpb": res.get("bpb")})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"run": a.run_dir, "patch": patch, "limit": a.limit, "rows": rows},
                                          indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
