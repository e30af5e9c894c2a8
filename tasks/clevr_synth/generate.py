"""Write a CLEVR v1.0-format dataset: images, scene graphs and questions, for any number of images.

Layout (exactly CLEVR v1.0's)::

    OUT/images/{split}/CLEVR_{split}_{i:06d}.png     RGBA like CLEVR's renders (alpha is 255 everywhere)
    OUT/scenes/CLEVR_{split}_scenes.json             {"info": ..., "scenes": [...]}
    OUT/questions/CLEVR_{split}_questions.json       {"info": ..., "questions": [...]}

How ``images`` is divided among splits: given split names, every split after the first gets
``floor(0.15 * images)`` images (at least 1 when there are enough images) and the first split gets the
rest, so ``train,val,test`` gives CLEVR's 70/15/15 and ``train,val`` gives 85/15. A mapping
``{split: count}`` sets the counts exactly.

Determinism: image ``i`` of a split is drawn from a generator seeded with (seed, split, i) alone, so
it does not depend on ``workers``, on the other splits, nor on rendering. Its questions draw their
randomness from (seed, split, i, family) alone too; what they take from earlier images is only the running
family and answer counts (balancing), applied in one pass per split in image order in this process. PNGs
are written with fixed encoder settings and no metadata, JSON with a fixed key order and no timestamps: the
same arguments give byte-identical files.

Parallelism (``workers`` > 1): each worker samples (and renders) an image and runs the expensive part of
its questions, the template searches, for the families the image will likely try, judged from the family
counts when the image was handed out (a few images stale); this process then applies the balancing to
those candidates and runs any search the worker did not (see ``questions.QuestionGenerator``). The
candidates are pure functions of (seed, split, i, family), so the output is the same for every ``workers``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from omnibyte.logging import show_bar

from .questions import QuestionGenerator, speculate
from .scene import sample_scene
from .templates import DEFAULT_TEMPLATES_DIR, load_templates

PNG_COMPRESS_LEVEL = 6
VAL_FRACTION = 0.15


def split_counts(images: int, splits: Iterable[str] | Mapping[str, int]) -> dict[str, int]:
    """Number of images per split (see the module docstring)."""
    if isinstance(splits, Mapping):
        return {str(k): int(v) for k, v in splits.items()}
    names = [str(s) for s in splits]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"split names must be distinct and non-empty, got {names}")
    rest = math.floor(VAL_FRACTION * images)
    if images >= len(names):
        rest = max(rest, 1)
    counts = {n: rest for n in names[1:]}
    counts = {names[0]: images - rest * (len(names) - 1), **counts}
    if counts[names[0]] < 0:
        raise ValueError(f"{images} images cannot be split among {names}")
    return counts


def _image_name(split: str, i: int) -> str:
    return f"CLEVR_{split}_{i:06d}.png"


def _make_scene(args: tuple) -> dict:
    """Sample (and render and save) one image; runs in worker processes too."""
    seed, split, i, size, render, image_dir = args
    width, height = size
    rng = random.Random(f"clevr-synth/{seed}/{split}/{i}")
    scene = sample_scene(rng, aspect=width / height)
    if render:
        from PIL import Image

        from .render import render as render_scene

        rgb = render_scene(scene, width, height)
        rgba = np.concatenate([rgb, np.full((height, width, 1), 255, np.uint8)], -1)
        Image.fromarray(rgba, "RGBA").save(os.path.join(image_dir, _image_name(split, i)), format="PNG",
                                           compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return public_scene(scene, split, i, width, height)


_FAMILIES: list[dict] = []  # a worker's question families (set by _init_worker)


def _init_worker(families: list[dict]) -> None:
    global _FAMILIES
    _FAMILIES = families


def _make_item(args: tuple) -> tuple[dict, dict]:
    """A worker's job: one image's scene (see _make_scene) and its speculated question candidates."""
    scene_args, key, k, hint = args
    scene = _make_scene(scene_args)
    return scene, speculate(_FAMILIES, scene, key, k, hint)


def public_scene(scene: dict, split: str, index: int, width: int, height: int) -> dict:
    """The scene as CLEVR's scenes JSON has it (private camera/light fields dropped)."""
    cam = scene["_camera"]
    objects = []
    for ob in scene["objects"]:
        px, py, depth = cam.project(ob["3d_coords"], width, height)
        objects.append({
            "color": ob["color"], "size": ob["size"], "rotation": ob["rotation"], "shape": ob["shape"],
            "3d_coords": ob["3d_coords"], "material": ob["material"],
            "pixel_coords": [int(round(px)), int(round(py)), round(depth, 6)],
        })
    return {"split": split, "image_index": index, "image_filename": _image_name(split, index),
            "objects": objects, "relationships": scene["relationships"], "directions": scene["directions"]}


#: bumped whenever the same seed would generate different data (2: the degeneracy test covers relate_filter_*
#: families, and objects must be visible inside the VQA configs' 10% crop); recorded in every file's info and in the default set's cache folder name
GENERATOR_VERSION = 2


def _info(split: str, seed: int, size: tuple[int, int], templates: str) -> dict:
    return {"split": split, "version": "1.0", "license": "Creative Commons Attribution (CC BY 4.0)",
            "generator": "omnibyte clevr-synth", "generator_version": GENERATOR_VERSION, "seed": seed,
            "size": f"{size[0]}x{size[1]}", "templates": templates}


def _dump(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def generate(out_dir: str | os.PathLike, images: int | None = 1000, questions_per_image: int = 10,
             seed: int = 0, size: tuple[int, int] = (480, 320),
             splits: Iterable[str] | Mapping[str, int] = ("train", "val"),
             templates_dir: str | os.PathLike | None = None, progress: bool = True, workers: int = 0,
             render: bool = True) -> dict:
    """Write a CLEVR v1.0-format dataset under ``out_dir``; returns a summary dict.

    ``render=False`` writes scenes and questions only (no images directory): the same scenes and
    questions as a rendered run with the same arguments.
    """
    if images is None:
        if not isinstance(splits, Mapping):
            raise ValueError("give images, or splits as a mapping split -> count")
        images = sum(splits.values())
    counts = split_counts(images, splits)
    width, height = int(size[0]), int(size[1])
    families = load_templates(templates_dir)
    tname = "builtin" if templates_dir is None else Path(templates_dir).name
    out = Path(out_dir)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    (out / "questions").mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(counts.values()), desc="clevr-synth", unit="img", disable=not show_bar(progress))
    pool = None
    if workers and workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn" if os.name == "nt" else "fork").Pool(workers, _init_worker, (families,))
    summary: dict[str, Any] = {"out_dir": str(out), "splits": {}}
    try:
        for split, n in counts.items():
            image_dir = out / "images" / split
            if render:
                image_dir.mkdir(parents=True, exist_ok=True)
            key = f"clevr-synth/{seed}/{split}"
            qgen = QuestionGenerator(families, key)
            jobs = [(seed, split, i, (width, height), render, str(image_dir)) for i in range(n)]
            if pool is None:
                items = ((scene, None) for scene in map(_make_scene, jobs))
            else:
                items = _pipelined(pool, jobs, key, questions_per_image, qgen, workers + 1)
            scenes, questions = [], []
            for scene, speculated in items:
                for q in qgen.questions_for(scene, questions_per_image, speculated):
                    questions.append({"image_index": scene["image_index"], "image_filename": scene["image_filename"],
                                      "split": split, "question_index": len(questions), **q})
                scenes.append(scene)
                bar.update(1)
            _dump({"info": _info(split, seed, (width, height), tname), "scenes": scenes},
                  out / "scenes" / f"CLEVR_{split}_scenes.json")
            _dump({"info": _info(split, seed, (width, height), tname), "questions": questions},
                  out / "questions" / f"CLEVR_{split}_questions.json")
            summary["splits"][split] = {"images": n, "questions": len(questions),
                                        "families": len({q["question_family_index"] for q in questions})}
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return summary


def _pipelined(pool, jobs: list[tuple], key: str, k: int, qgen: QuestionGenerator, window: int):
    """(scene, speculated candidates) per job, in order, from ``pool``; at most ``window`` images in flight, each
    handed out with the family counts of the moment (so the worker guesses the families it will try)."""
    pending: deque = deque()
    it = iter(jobs)

    def submit() -> None:
        job = next(it, None)
        if job is not None:
            pending.append(pool.apply_async(_make_item, ((job, key, k, qgen.hint(job[2], k)),)))

    for _ in range(window):
        submit()
    while pending:
        yield pending.popleft().get()
        submit()  # after the caller counted that image's questions


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x320, got {text!r}") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"size too small: {text!r}")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnibyte prepare clevr-synth",
        description="Generate a CLEVR v1.0-format dataset (images, scenes, questions) offline, without Blender.")
    p.add_argument("--out", required=True, help="output directory (CLEVR layout is written inside)")
    p.add_argument("--images", type=int, default=None,
                   help="total number of images over all splits, at least one per split (default 1000; with "
                        "counts in --split-names, their sum: --images may then only repeat it)")
    p.add_argument("--questions-per-image", type=int, default=10,
                   help="questions per image (>= 1), each from a different family (fewer when none fits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_parse_size, default=(480, 320), help="WIDTHxHEIGHT (default 480x320)")
    p.add_argument("--split-names", default="train,val",
                   help="comma-separated; later splits get 15%% of the images each, the first the rest. "
                        "Exact counts: train=700,val=150")
    p.add_argument("--templates", default=None,
                   help=f"directory of CLEVR 1.0 template *.json files (default: ours, {DEFAULT_TEMPLATES_DIR.name}/)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes for rendering and question search (>= 0; 0: none; output does not depend on it)")
    p.add_argument("--no-render", action="store_true", help="scenes and questions only, no images")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_arguments(args: argparse.Namespace) -> tuple[int, dict[str, int]]:
    """(images, images per split) from the parsed arguments, or a ConfigError naming the option at fault: every
    split gets at least one image, ``--images`` and counts in ``--split-names`` agree, no negative counts."""
    from omnibyte.config import ConfigError

    if args.questions_per_image < 1:
        raise ConfigError(f"--questions-per-image must be >= 1, got {args.questions_per_image}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0: render in this process), got {args.workers}")
    if args.images is not None and args.images < 1:
        raise ConfigError(f"--images must be >= 1, got {args.images}")
    names = [s.strip() for s in args.split_names.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--split-names names no split, got {args.split_names!r}")
    if any("=" in s for s in names):  # exact counts: every split has one
        counts: dict[str, int] = {}
        for item in names:
            name, eq, value = (t.strip() for t in item.partition("="))
            if not eq or not name:
                raise ConfigError(f"--split-names: give every split a count (train=700,val=150) or none, got "
                                  f"{args.split_names!r}")
            try:
                n = int(value)
            except ValueError:
                raise ConfigError(f"--split-names: {name}={value!r} is not a whole number of images") from None
            if n < 1:
                raise ConfigError(f"--split-names: {name}={n}: each split needs >= 1 image")
            if name in counts:
                raise ConfigError(f"--split-names: split {name!r} given twice")
            counts[name] = n
        total = sum(counts.values())
        if args.images is not None and args.images != total:
            raise ConfigError(f"--images {args.images} disagrees with --split-names {args.split_names} ({total} "
                              f"images); drop --images (the counts set the total) or make them agree")
        return total, counts
    if len(set(names)) != len(names):
        raise ConfigError(f"--split-names: split names must be distinct, got {args.split_names!r}")
    images = 1000 if args.images is None else args.images
    try:
        counts = split_counts(images, names)
    except ValueError:
        counts = {}
    if not counts or min(counts.values()) < 1:
        raise ConfigError(f"--images {images} cannot be split among --split-names {','.join(names)} with at least "
                          f"one image each (got {counts or 'a negative count'}); raise --images or give exact counts "
                          f"(train=700,val=150)")
    return images, counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    images, splits = check_arguments(args)
    summary = generate(args.out, images, args.questions_per_image, args.seed, args.size, splits,
                       args.templates, progress=not args.no_progress, workers=args.workers,
                       render=not args.no_render)
    for split, s in summary["splits"].items():
        print(f"{split}: {s['images']} images, {s['questions']} questions from {s['families']} families")
    print(f"wrote {summary['out_dir']}")
    return 0
