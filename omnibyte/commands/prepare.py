"""omnibyte prepare <config> [key=value ...] [options] | omnibyte prepare <generator> [its arguments]

Writes a run config's data once, ahead of training:

* webdataset shards of the task's raw samples (images stay undecoded file bytes), one set per split:
  ``<out>/<split>-NNNNNN.tar`` + ``<out>/<split>.shards.json``; train on them with
  ``data.source=shards data.path=<out>`` (or serve ``<out>`` over HTTP: ``data.path=https://host/dir``);
* with ``--h5``, also an h5py store of the serializer's streams per split, ``<out>/<split>.h5``
  (pre-serialized: fast re-runs and random access); train on it with ``data.source=h5 data.path=<out>/train.h5``.

Both record the token contract, the task and serializer configs, the split's answer set and the skip counts
(:mod:`omnibyte.data.provenance`).

Generators. A task class may name data generators, ``generators = {"clevr-synth": "omnibyte.tasks.clevr_synth:main"}``;
``omnibyte prepare clevr-synth --out DIR --images N ...`` runs that ``main(argv)`` (found through the task
registry and loaded by name) with the arguments after its name (``omnibyte prepare clevr-synth --help``).
"""

from __future__ import annotations

import argparse

HELP = "write a config's data as webdataset shards (and an h5 store of streams), or run a task's data generator"


def _options(p) -> None:
    p.add_argument("--out", default="", help="output folder (default: data.path of the config, else data/<run_name>)")
    p.add_argument("--splits", default="", help="comma-separated splits (default: data.train_split and eval.split)")
    p.add_argument("--h5", action="store_true", help="also write <out>/<split>.h5 of serialized streams")
    p.add_argument("--no-shards", action="store_true", help="write only the h5 store")
    p.add_argument("--max-samples", type=int, default=0, help="at most this many samples per split (0: all)")
    p.add_argument("--shard-samples", type=int, default=10_000, help="samples per shard at most")
    p.add_argument("--shard-mb", type=int, default=256, help="payload MiB per shard at most")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bars (--no-progress: the same, its older name)")


def add_arguments(p) -> None:

    p.epilog = ("Options may come before or after the config. With a generator's name (e.g. clevr-synth) "
                "instead of a config, the arguments after it are the generator's own.")
    p.add_argument("config", help="run config (name in configs/ or YAML path), or a data generator's name")
    _options(p)
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                   help="key=value overrides and options; for a generator, its arguments")


def _parser() -> argparse.ArgumentParser:
    from omnibyte.config_doc import HelpFormatter

    p = argparse.ArgumentParser(prog="omnibyte prepare", description=HELP, formatter_class=HelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.root=/data/CLEVR_v1.0")
    _options(p)
    return p


def run(args) -> int:
    from omnibyte.data.prepare import find_generator, prepare

    gen = find_generator(args.config)
    if gen is not None:
        return int(gen(list(args.args)) or 0)
    # options after the config: parsed into args, so those given before it are kept (argparse sets only
    # the defaults a namespace lacks); prepare() checks them first
    opts = _parser().parse_args(args.args, namespace=args)
    for line in prepare(args.config, opts.overrides, out=opts.out, splits=opts.splits, h5=opts.h5,
                        shards=not opts.no_shards, max_samples=opts.max_samples, shard_samples=opts.shard_samples,
                        shard_mb=opts.shard_mb, progress=not opts.quiet):
        print(line)
    return 0
