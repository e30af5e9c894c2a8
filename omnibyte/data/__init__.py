"""Data: sources (task samples, webdataset shards, h5 streams), packing, and the training/eval loaders."""

from .items import EvalItem, eval_items  # noqa: F401
from .loader import TrainLoader, eval_batches  # noqa: F401
from .packing import concat_rows, pad_rows  # noqa: F401
from .sources import recorded_answers  # noqa: F401
