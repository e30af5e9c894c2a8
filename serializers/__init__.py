"""Serializers: raw samples -> ByteStreams. Importing this package registers every shipped one."""

from . import base, jpeg, pixels, png, qa, text  # noqa: F401  (registers jpeg, pixels, png, qa, utf8)
