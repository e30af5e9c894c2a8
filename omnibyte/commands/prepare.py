"""omnibyte prepare <config> [key=value ...] [--out DIR] [--splits a,b] [--h5] | prepare clevr-synth ...

Writes a run config's data once, ahead of training:

* webdataset shards of the task's raw samples (images stay undecoded file bytes), one set per split:
  ``<out>/<split>-NNNNNN.tar`` + ``<out>/<split>.shards.json``; train on them with
  ``data.source=shards data.path=<out>``;
* with ``--h5``, also an h5py store of the serializer's streams per split, ``<out>/<split>.h5``
  (pre-serialized: fast re-runs and random access); train on it with ``data.source=h5 data.path=<out>/train.h5``.

``omnibyte prepare clevr-synth --out DIR --images N ...`` runs the offline CLEVR-format generator instead
(its own arguments; see ``omnibyte prepare clevr-synth --help``).
"""

from __future__ import annotations

import argparse

HELP = "write a config's data as webdataset shards (and an h5 store of streams), or generate CLEVR-format data"

GENERATORS = ("clevr-synth",)


def add_arguments(p) -> None:
    p.add_argument("config", help="run config (name in configs/ or YAML path), or 'clevr-synth'")
    p.add_argument("args", nargs=argparse.REMAINDER,
                   help="key=value overrides and options (--out DIR, --splits a,b, --h5, --no-shards, "
                        "--max-samples N, --shard-samples N); for clevr-synth, the generator's arguments")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnibyte prepare <config>", description=HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.root=/data/CLEVR_v1.0")
    p.add_argument("--out", default="", help="output folder (default: data.path of the config, else data/<run_name>)")
    p.add_argument("--splits", default="", help="comma-separated splits (default: data.train_split and eval.split)")
    p.add_argument("--h5", action="store_true", help="also write <out>/<split>.h5 of serialized streams")
    p.add_argument("--no-shards", action="store_true", help="write only the h5 store")
    p.add_argument("--max-samples", type=int, default=0, help="at most this many samples per split (0: all)")
    p.add_argument("--shard-samples", type=int, default=10_000, help="samples per shard at most")
    p.add_argument("--shard-mb", type=int, default=256, help="payload MiB per shard at most")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args) -> int:
    if args.config in GENERATORS:
        from omnibyte.tasks.clevr_synth import main as synth_main  # lazy: heavy, and only this verb needs it

        return int(synth_main(list(args.args)) or 0)
    opts = _parser().parse_args(args.args)
    return prepare(args.config, opts.overrides, out=opts.out, splits=opts.splits, h5=opts.h5,
                   shards=not opts.no_shards, max_samples=opts.max_samples, shard_samples=opts.shard_samples,
                   shard_bytes=opts.shard_mb << 20, progress=not opts.no_progress)


def prepare(config, overrides=(), *, out: str = "", splits: str | list[str] = "", h5: bool = False,
            shards: bool = True, max_samples: int = 0, shard_samples: int = 10_000, shard_bytes: int = 256 << 20,
            progress: bool = True) -> int:
    import itertools
    import json
    from pathlib import Path

    from omnibyte.config import to_dict
    from omnibyte.data.h5store import write_streams
    from omnibyte.data.shards import write_shards
    from omnibyte.errors import DataError, SerializationError
    from omnibyte.registry import SERIALIZERS, TASKS
    from omnibyte.runconfig import load_run_config

    run_cfg = load_run_config(config, list(overrides))
    task = TASKS.build(run_cfg.task)
    serializer = SERIALIZERS.build(run_cfg.serializer) if h5 else None
    out_dir = Path(out or run_cfg.data.path or Path("data") / run_cfg.run_name)
    if out_dir.suffix == ".h5":  # data.path of an h5 run names the file; its folder holds the splits
        out_dir = out_dir.parent
    available = task.splits()
    if isinstance(splits, str):
        wanted = [s for s in splits.split(",") if s] if splits else []
    else:
        wanted = list(splits)
    if not wanted:
        wanted = [s for s in dict.fromkeys([run_cfg.data.train_split, run_cfg.eval.split]) if s in available]
    for s in wanted:
        if s not in available:
            raise DataError(f"task {run_cfg.task.name!r} has no split {s!r} (splits: {', '.join(available)})")
    if not shards and not h5:
        raise DataError("nothing to write: --no-shards without --h5")
    extra = {"task": to_dict(run_cfg.task), "config": run_cfg.run_name}
    for split in wanted:
        total = task.num_samples(split)
        if total is not None and max_samples:
            total = min(total, max_samples)

        def samples(split=split):
            it = task.samples(split)
            return itertools.islice(it, max_samples) if max_samples else it

        if shards:
            idx = write_shards(samples(), out_dir, split, max_count=shard_samples, max_bytes=shard_bytes,
                               total=total, progress=progress, extra=extra)
            print(f"{split}: {json.loads(idx.read_text())['num_samples']} samples -> {out_dir}/{split}-*.tar")
        if h5:
            skipped = 0

            def streams(split=split):
                nonlocal skipped
                for s in samples(split):
                    try:
                        yield serializer(s)
                    except SerializationError:
                        if task.config.on_bad_sample == "fail":
                            raise
                        skipped += 1

            path = write_streams(streams(), out_dir / f"{split}.h5", serializer_config=run_cfg.serializer,
                                 split=split, total=total, progress=progress,
                                 extra={"task": to_dict(run_cfg.task)})
            print(f"{split}: streams -> {path}" + (f" ({skipped} skipped)" if skipped else ""))
    if task.skipped:
        print(f"skipped {task.skipped} bad samples (task.on_bad_sample=skip)")
    train = run_cfg.data.train_split
    if shards:
        print(f"train on them: omnibyte train {config} data.source=shards data.path={out_dir}")
    if h5 and train in wanted:
        print(f"or, pre-serialized: omnibyte train {config} data.source=h5 data.path={out_dir / (train + '.h5')}")
    return 0
