"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP) for DDP and FSDP2 runs.

Under FSDP2 each rank holds a shard of every parameter and of its optimizer state; gathering them on rank 0 to
write one file needs the whole model and optimizer state in one process's memory. Here every rank writes its own
shards instead (``get_state_dict`` with ``full_state_dict=False``, then ``dcp.save``): nothing is gathered. Under
DDP the replicated tensors are written once (DCP de-duplicates them across ranks).

The ``dcp/`` folder holds ``{"model": ..., "optim": ...}`` keyed by parameter names of the unwrapped model (the
same names as ``model.state_dict()``), so:

* resuming under the same number of processes loads each rank's shards back (``load_sharded``);
* one CPU process reads the model part alone (``load_model_weights``), for ``omnibyte eval`` / ``generate`` and
  ``train.init_from``, allocating tensors from the checkpoint's metadata (no model needed).

A different world size on resume is refused earlier, by the data position (each rank owns a fixed slice of the
data stream): resume with the number of processes that wrote the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _options(full: bool, cpu_offload: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=cpu_offload)


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of model and optimizer state into ``path`` (a folder on a shared disk)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options(full=False))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load this rank's shards of a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        msd = get_model_state_dict(model, options=_options(full=False))
        dcp.load({"model": msd}, checkpoint_id=str(path))
        set_model_state_dict(model, msd, options=_options(full=False))
        return
    msd, osd = get_state_dict(model, optimizer, options=_options(full=False))
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_options(full=False))


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint as plain CPU tensors, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights: dict[str, torch.Tensor] = {}
    for key, md in meta.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            weights[key[len("model."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not weights:
        raise ValueError(f"{path}: a sharded checkpoint without model weights")
    import warnings

    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": weights}, checkpoint_id=str(path), no_dist=True)
    return weights
