"""Data: sources (task samples, webdataset shards, h5 streams), packing, and the training/eval loaders."""

from .loader import TrainLoader, eval_batches  # noqa: F401
from .packing import concat_rows, pad_rows  # noqa: F401
