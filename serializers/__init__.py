"""Serializers: raw samples -> ByteStreams. Importing this package registers every shipped one."""

from . import base  # noqa: F401
from . import jpeg, pixels, png, qa, text  # noqa: F401  (each registers itself)
