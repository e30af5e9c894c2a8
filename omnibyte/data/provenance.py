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
made under another token contract or for another task, and an h5 store made with another serializer config.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..errors import DataError
from ..vocab import CONTRACT_VERSION


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


def check_store(record: dict[str, Any], where: str, *, task_name: str, serializer_config: Any = None,
                streams: bool = False) -> None:
    """Refuse a store made for another run (module docstring). ``streams``: the store holds serialized
    streams (h5), so its serializer config must be this run's too. ``where`` names the store in errors."""
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
    if not streams:
        return
    mine = serializer_record(serializer_config)
    theirs = record.get("serializer")
    if theirs is None or record.get("serializer_sha256") is None:
        raise DataError(f"{where}: the store records no serializer config; {hint}")
    if record["serializer_sha256"] != mine["serializer_sha256"]:
        raise DataError(f"{where}: store made with serializer {_short(theirs)}, this run's serializer is "
                        f"{_short(mine['serializer'])}; {hint} --h5")
