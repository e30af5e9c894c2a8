"""Exceptions users see. Each names the thing at fault (a sample id, a file, a YAML path)."""

from __future__ import annotations

from .config import ConfigError  # noqa: F401  (re-exported)
from .registry import RegistryError  # noqa: F401  (re-exported)


class SerializationError(ValueError):
    """A sample that cannot become a correct byte stream. Never a silently wrong stream instead."""

    def __init__(self, sample_id: str, reason: str, serializer: str = ""):
        self.sample_id = sample_id
        self.reason = reason
        self.serializer = serializer
        by = f" [{serializer}]" if serializer else ""
        super().__init__(f"sample {sample_id!r}{by}: {reason}")


class DataError(ValueError):
    """A dataset that is missing, malformed or inconsistent (names the file and what is wrong)."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps in a row)."""
