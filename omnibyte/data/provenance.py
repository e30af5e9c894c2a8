"""What a prepared store holds, and the refusal to read one that was made for another run.

Shard indexes (``<split>.shards.json``) and h5 stores record, when they are written:

* ``contract_version``: the token contract (:mod:`omnibyte.vocab`) of the writing omnibyte;
* ``task``: the task config (``name`` and the rest) whose samples they hold;
* ``serializer``: the serializer config as readable JSON, and ``serializer_sha256``: the sha256 of its
  canonical form (``json.dumps(sort_keys=True, separators=(",", ":"))``, UTF-8). Shards hold raw samples,
  so for them it only says which run prepared them; an h5 store's streams *are* that serializer's output;
* ``answers``: the split's sorted distinct ``answer`` values (``null`` when no sample has one), so a run can
  take its VQA answer set from its training data without reading it;
* ``task_skipped`` / ``bad_samples``: what the task and the serializer skipped while writing.

:func:`check_store` refuses (:class:`~omnibyte.errors.DataError`, naming ``data.path`` and both sides) a store
made under another token contract, for another task or under other task settings that shape the samples (e.g.
``task.max_bytes``, ``task.families``: a store prepared with books cut to 2,000 bytes used to train a run whose
config said whole books), and an h5 store made with another serializer config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from ..errors import DataError
from ..vocab import CONTRACT_VERSION

log = logging.getLogger("omnibyte.data")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_record(config: Any) -> dict[str, Any] | None:
    """A config (dataclass node or dict) as plain JSON data."""
    if config is None:
        return None
    from ..config import to_dict

    return json.loads(json.dumps(to_dict(config)))


def serializer_record(config: Any) -> dict[str, Any]:
    """``{"serializer": <config as JSON data>, "serializer_sha256": <hash of its canonical form>}``."""
    cfg = config_record(config)
    digest = hashlib.sha256(canonical(cfg).encode("utf-8")).hexdigest() if cfg is not None else None
    return {"serializer": cfg, "serializer_sha256": digest}


def store_record(task_config: Any = None, serializer_config: Any = None) -> dict[str, Any]:
    """The provenance fields every store records (see the module docstring)."""
    return {"contract_version": CONTRACT_VERSION, "task": config_record(task_config),
            **serializer_record(serializer_config)}


class AnswerSet:
    """Collects the distinct ``answer`` values of the samples written (see :func:`answers`)."""

    def __init__(self):
        self.values: set[str] = set()
        self.any = False

    def add(self, sample: dict[str, Any]) -> None:
        if sample.get("answer") is not None:
            self.any = True
            self.values.add(str(sample["answer"]))

    def result(self) -> list[str] | None:
        return sorted(self.values) if self.any else None


def _short(cfg: Any) -> str:
    return canonical(cfg) if cfg is not None else "none recorded"


def task_differences(recorded: dict[str, Any], mine: dict[str, Any], neutral: frozenset[str] = frozenset()
                     ) -> list[str]:
    """The task-config keys whose recorded value (the store's) differs from ``mine`` (this run's, as
    :func:`config_record` gives it), as ``key: store's -> run's`` lines. Keys in ``neutral`` (a task's
    :meth:`~tasks.base.Task.store_neutral_for`: read at evaluation or run time, not by the samples), ``name``
    and ``root`` are left out, and so is a key the store does not record (written before the key existed)."""
    out = []
    for key in sorted(set(mine) - {"name", "root"} - set(neutral)):
        if key in recorded and canonical(recorded[key]) != canonical(mine[key]):
            out.append(f"task.{key}: {_short(recorded[key])} -> {_short(mine[key])}")
    return out


def check_store(record: dict[str, Any], where: str, *, task_name: str, serializer_config: Any = None,
                streams: bool = False, run_task: Any = None) -> None:
    """Refuse a store made for another run (module docstring). ``streams``: the store holds serialized
    streams (h5), so its serializer config must be this run's too. ``run_task``: this run's task object; a
    store whose samples were made under other task settings (``task.max_bytes``, ``task.families``, ...) is
    refused, naming each key (:func:`task_differences`); another ``task.root`` is only logged, since a store's
    samples are the same wherever its source folder has moved. ``where`` names the store in errors."""
    hint = "re-run `omnibyte prepare <config>` for this run"
    version = record.get("contract_version")
    if version is None or int(version) != CONTRACT_VERSION:
        raise DataError(f"{where}: store written under token contract version {version}, this omnibyte uses "
                        f"{CONTRACT_VERSION}; {hint}")
    task = record.get("task")
    if not isinstance(task, dict) or not task.get("name"):
        raise DataError(f"{where}: the store records no task; {hint}")
    if task["name"] != task_name:
        raise DataError(f"{where}: store made for task {task['name']!r}, this run's task is {task_name!r}")
    if run_task is not None:
        current = config_record(run_task.config) or {}
        diff = task_differences(task, current, run_task.store_neutral_for(task))
        if diff:
            raise DataError(f"{where}: store made under other task settings, so its samples are not this run's "
                            f"({'; '.join(diff)}); {hint}, or set those keys as the store has them")
        theirs, mine = task.get("root"), current.get("root")
        if theirs is not None and mine and theirs != mine:
            log.warning("%s: store prepared from task.root=%s; this run's task.root=%s is not read (the store's "
                        "samples are used)", where, theirs, mine)
    if not streams:
        return
    mine = serializer_record(serializer_config)
    theirs = record.get("serializer")
    if theirs is None or record.get("serializer_sha256") is None:
        raise DataError(f"{where}: the store records no serializer config; {hint}")
    if record["serializer_sha256"] != mine["serializer_sha256"]:
        raise DataError(f"{where}: store made with serializer {_short(theirs)}, this run's serializer is "
                        f"{_short(mine['serializer'])}; {hint} --h5")
