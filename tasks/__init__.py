"""Tasks: datasets in their native layouts, and their metrics. Importing this package registers them."""

import importlib
import importlib.util

from . import base  # noqa: F401

# TODO(lead): replace with plain imports once every module has landed.
for _mod in ("synthetic", "clevr", "pg19", "cnn_lstm"):
    if importlib.util.find_spec(f"{__name__}.{_mod}") is not None:
        importlib.import_module(f"{__name__}.{_mod}")
