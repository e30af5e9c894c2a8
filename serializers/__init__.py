"""Serializers: raw samples -> ByteStreams. Importing this package registers every shipped one."""

from . import base, jpeg, png, qa, text  # noqa: F401  (registers jpeg, png, qa, utf8)
