"""Serializers: raw samples -> ByteStreams. Importing this package registers every shipped one."""

from . import base  # noqa: F401
