"""Writing a run config's data ahead of training (``omnibyte prepare``), and the tasks' data generators.

See :mod:`omnibyte.commands.prepare` for the layout written; :func:`prepare` returns the lines the verb prints.
"""

from __future__ import annotations


def generators() -> dict[str, str]:
    """Generator name -> ``"module:function"``, from the ``generators`` of the registered task classes."""
    from omnibyte.registry import TASKS

    out: dict[str, str] = {}
    for name in TASKS.names():
        for gen, target in (getattr(TASKS.get(name), "generators", None) or {}).items():
            out.setdefault(gen, target)
    return out


def find_generator(name: str):
    """The generator function named ``name`` (a task's ``generators`` entry), or None for a config."""
    from pathlib import Path

    if Path(name).exists() or name.endswith((".yaml", ".yml")):
        return None
    target = generators().get(name)
    if target is None:
        return None
    import importlib

    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func or "main")


def check_arguments(*, max_samples: int, shard_samples: int, shard_mb: int) -> None:
    """prepare's own arguments, refused with a ConfigError naming the option."""
    from omnibyte.config import ConfigError

    if max_samples < 0:
        raise ConfigError(f"--max-samples must be >= 0 (0: all samples), got {max_samples}")
    if shard_samples < 1:
        raise ConfigError(f"--shard-samples must be >= 1, got {shard_samples}")
    if shard_mb < 1:
        raise ConfigError(f"--shard-mb must be >= 1, got {shard_mb}")


def _skips(counts: dict[str, int]) -> str:
    said = [f"{n} {k.replace('_', ' ')}" for k, n in counts.items() if n]
    return f" ({', '.join(said)}; on_bad_sample=skip)" if said else ""


def _through(samples, writer, state: dict):
    """``samples`` as they come, each added to the shard ``writer`` (if any) on its way; ``state["failed"]``
    is set when reading or adding one raised."""
    try:
        for s in samples:
            if writer is not None:
                writer.add(s)
            yield s
    except Exception:
        state["failed"] = True
        raise


def prepare(config, overrides=(), *, out: str = "", splits: str | list[str] = "", h5: bool = False,
            shards: bool = True, max_samples: int = 0, shard_samples: int = 10_000, shard_mb: int = 256,
            progress: bool = True) -> list[str]:
    """Write the shards (and h5 stores) of ``config``'s splits; returns what to tell the user."""
    import collections
    import contextlib
    import itertools
    from pathlib import Path

    from omnibyte.data.h5store import write_streams
    from omnibyte.data.shard_writer import ShardWriter
    from omnibyte.data.sources import sample_meta, serialize, task_samples
    from omnibyte.errors import DataError
    from omnibyte.registry import SERIALIZERS, TASKS
    from omnibyte.runconfig import load_run_config

    lines: list[str] = []
    check_arguments(max_samples=max_samples, shard_samples=shard_samples, shard_mb=shard_mb)
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
    policy = task.config.on_bad_sample
    for split in wanted:
        total = task.num_samples(split)
        if total is not None and max_samples:
            total = min(total, max_samples)
        skipped: dict[str, int] = {}  # the task's skips (task_skipped), counted in the one pass over the split
        bad: dict[str, int] = {}  # serialize's bad_samples
        samples = (s for _, s in task_samples(task, split, skipped))
        if max_samples:
            samples = itertools.islice(samples, max_samples)

        def shard_extra(skipped=skipped):
            return {"config": run_cfg.run_name, "task_skipped": skipped.get("task_skipped", 0)}

        with contextlib.ExitStack() as stack:  # a writer left unfinished removes its partial shard
            writer = stack.enter_context(ShardWriter(
                out_dir, split, max_count=shard_samples, max_bytes=shard_mb << 20, total=total, progress=progress,
                task=run_cfg.task, serializer=run_cfg.serializer)) if shards else None
            state = {"failed": False}
            passed = _through(samples, writer, state)
            if h5:
                records = ((stream, sample_meta(s)) for s, stream in
                           serialize(((s, s) for s in passed), serializer, policy, bad))
                try:
                    path = write_streams(records, out_dir / f"{split}.h5", serializer_config=run_cfg.serializer,
                                         task_config=run_cfg.task, split=split, total=total, progress=progress,
                                         extra=lambda skipped=skipped, bad=bad: {
                                             "task_skipped": skipped.get("task_skipped", 0),
                                             "bad_samples": bad.get("bad_samples", 0)})
                except Exception:
                    if writer is not None and not state["failed"]:
                        # the store failed, not the samples: the shards are completed all the same, as they
                        # were when written in a pass of their own before the store's
                        collections.deque(passed, maxlen=0)
                        writer.finish(shard_extra)
                    raise
            else:
                collections.deque(passed, maxlen=0)
            if writer is not None:
                n = writer.finish(shard_extra)["num_samples"]
                lines.append(f"{split}: {n} samples -> {out_dir}/{split}-*.tar" + _skips(skipped))
        if h5:
            lines.append(f"{split}: streams -> {path}" + _skips({**skipped, "bad_samples": bad.get("bad_samples", 0)}))
    train = run_cfg.data.train_split
    if shards:
        lines.append(f"train on them: omnibyte train {config} data.source=shards data.path={out_dir}")
    if h5 and train in wanted:
        lines.append(f"or, pre-serialized: omnibyte train {config} data.source=h5 data.path={out_dir / (train + '.h5')}")
    return lines
