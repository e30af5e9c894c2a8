"""Tasks: datasets in their native layouts, and their metrics. Importing this package registers them."""

from . import base  # noqa: F401
