"""Reading prepared shards (written by :mod:`.shard_writer`) through webdataset's own pipeline.

``data.path`` (``data.source: shards``) names a shard set in one of two forms:

* **a location**: a local folder, or a URL prefix webdataset's ``gopen`` opens (``http(s)://host/dir``,
  ``file:///dir``, ...). The split's index is ``<path>/<split>.shards.json``; its shards are ``<path>/<name>``
  for each name the index lists, in the index's order.
* **a shard spec with ``{split}``**: after ``{split}`` is replaced, anything webdataset accepts for a list of
  tar files: brace lists (``/data/clevr/{split}-{000000..000009}.tar``), local globs (``/data/clevr/{split}-*.tar``),
  URLs, ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/clevr/{split}-{000000..000009}.tar -``). The index
  is read from the first shard's URL or command with the shard's file name replaced by ``<split>.shards.json``.
  A spec may name a subset of the split's shards; each one must be listed in the index.

The index is opened with ``webdataset.gopen``; each shard is read by a ``webdataset.DataPipeline`` of
``SimpleShardList([url])`` and ``tarfile_to_samples()``, and a shard read to its end must hold exactly the
samples its index entry counts (a truncated or replaced shard is an error naming it). The split of shards
over ranks and workers is the loader's (:mod:`.loader`), by *logical* worker id, so webdataset's
``split_by_node``/``split_by_worker`` (which use the physical worker id) and ``ResampledShards`` (which
resamples with replacement) are not used: the stream must be exactly resumable. For that, :meth:`ShardSet.read`
seeks to any sample of a list of shards using the index's per-shard counts (whole shards are skipped
unopened).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from .provenance import check_store
from .shard_writer import FORMAT, index_name, write_shards  # noqa: F401  (write_shards re-exported)

_TAR = re.compile(r"[^/\s'\"=:]+\.tar\b")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _join(location: str, name: str) -> str:
    return os.path.join(location, name) if _is_local(location) else location.rstrip("/") + "/" + name


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e.args[0]) if e.args else type(e).__name__


def _tar_name(url: str, path: str) -> re.Match:
    found = list(_TAR.finditer(url))
    if not found:
        raise DataError(f"data.path={path}: {url!r} names no .tar file")
    return found[-1]


def decode_sample(members: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`.shard_writer.encode_sample` for one webdataset sample (``json``, ``<f>.<ext>``)."""
    sample: dict[str, Any] = {}
    if "json" in members:
        sample.update(json.loads(members["json"].decode("utf-8")))
    for name, payload in members.items():
        if name == "json" or name.startswith("__"):
            continue
        field, _, ext = name.partition(".")
        sample[field] = payload.decode("utf-8") if ext == "txt" else payload
    return sample


class ShardSet:
    """The shards of one prepared split (module docstring): ``urls``, per-shard ``counts``, the ``index``."""

    def __init__(self, path: str | os.PathLike, split: str):
        self.path, self.split = str(path), split
        if "{split}" in self.path:
            urls = self._expand(self.path.replace("{split}", split))
            first = _tar_name(urls[0], self.path)
            self.index_url = urls[0][: first.start()] + index_name(split) + urls[0][first.end():]
            names = [_tar_name(u, self.path).group() for u in urls]
        else:
            if self.path.startswith("pipe:"):
                raise DataError(f"data.path={self.path}: a pipe: command must be a shard spec with {{split}}, "
                                f"e.g. pipe:curl -s https://host/dir/{{split}}-{{000000..000009}}.tar")
            self.index_url = _join(self.path, index_name(split))
            urls, names = [], None
        self.index = self._read_index()
        listed = {s["name"]: int(s["samples"]) for s in self.index["shards"]}
        sizes = {s["name"]: s.get("bytes") for s in self.index["shards"]}
        if names is None:
            names = list(listed)
            urls = [_join(self.path, n) for n in names]
        for n in names:
            if n not in listed:
                raise DataError(f"data.path={self.path}: shard {n} is not listed in {self.index_url}")
        if len(set(names)) != len(names):
            raise DataError(f"data.path={self.path}: a shard is named twice")
        self.urls, self.names = urls, names
        self.counts = [listed[n] for n in names]
        for u, n in zip(urls, names):
            if _is_local(u) and not Path(u).is_file():
                raise DataError(f"{u}: shard listed in {index_name(split)} is missing")
            # a tar cut on a member boundary reads as a clean, shorter archive (its last sample loses members
            # and the sample count can still match): a local shard must have the size its index recorded
            if _is_local(u) and sizes[n] is not None and (size := Path(u).stat().st_size) != int(sizes[n]):
                raise DataError(f"{u}: {size} bytes, its index entry in {index_name(split)} says {sizes[n]} "
                                f"(a truncated or replaced shard? re-run `omnibyte prepare <config>`)")

    def _expand(self, spec: str) -> list[str]:
        from webdataset.shardlists import expand_urls

        urls: list[str] = []
        for u in expand_urls(spec):
            if _is_local(u) and any(c in u for c in "*?["):
                found = sorted(glob.glob(u))
                if not found:
                    raise DataError(f"data.path={self.path}: no file matches {u}")
                urls += found
            else:
                urls.append(u)
        return urls

    def _read_index(self) -> dict[str, Any]:
        url = self.index_url
        if _is_local(url) and not Path(url).is_file():
            folder = Path(url).parent
            have = sorted(p.name[: -len(".shards.json")] for p in folder.glob("*.shards.json"))
            hint = f" (prepared splits: {', '.join(have)})" if have else ""
            raise DataError(f"{folder}: no prepared split {self.split!r}: {Path(url).name} is missing{hint}; "
                            f"prepare it with `omnibyte prepare <config> --splits {self.split}`")
        from webdataset import gopen

        try:
            with gopen(url) as f:
                raw = f.read()
        except Exception as e:  # gopen's own errors (curl exit status, missing files, ...)
            raise DataError(f"{url}: cannot read the shard index ({_reason(e)}); prepare the split with "
                            f"`omnibyte prepare <config> --splits {self.split}`") from None
        try:
            index = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{url}: malformed shard index: {e}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            got = index.get("format") if isinstance(index, dict) else None
            raise DataError(f"{url}: shard format {got!r}, this omnibyte reads format {FORMAT} "
                            f"(re-run `omnibyte prepare <config>`)")
        return index

    @property
    def where(self) -> str:
        return f"data.path={self.path} (split {self.split!r})"

    def check(self, task_name: str, task=None) -> ShardSet:
        """Refuse shards of another task, token contract or (``task``: this run's task object) task settings
        (:func:`.provenance.check_store`)."""
        check_store(self.index, self.where, task_name=task_name, run_task=task)
        return self

    @property
    def answers(self) -> tuple[str, ...] | None:
        a = self.index.get("answers")
        return tuple(a) if a is not None else None

    def __len__(self) -> int:
        return sum(self.counts)

    def _one(self, i: int, skip: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        url = self.urls[i]
        it = iter(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))
        n = 0
        while True:
            try:
                s = next(it)
            except StopIteration:
                break
            except Exception as e:  # webdataset re-raises gopen / tar errors with the url appended
                raise DataError(f"{url}: unreadable shard: {_reason(e)}") from None
            if n >= skip:
                yield decode_sample(s)
            n += 1
        if n != self.counts[i]:
            raise DataError(f"{url}: {n} samples, its index entry says {self.counts[i]} (a truncated or replaced "
                            f"shard? re-run `omnibyte prepare <config>`)")

    def read(self, shards: Sequence[int] | None = None, start: int = 0) -> Iterator[dict[str, Any]]:
        """The samples of ``shards`` (indexes into :attr:`urls`; default all, in order) one after the other,
        from sample ``start`` of that sequence on (whole shards before it are not opened)."""
        for i in range(len(self.urls)) if shards is None else shards:
            if start >= self.counts[i]:
                start -= self.counts[i]
                continue
            yield from self._one(i, start)
            start = 0
