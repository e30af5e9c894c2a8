"""Serializers: raw samples -> ByteStreams. Importing this package registers every shipped one.

Every public module of this folder is imported (sorted by name), so adding a serializer is one new file
with one ``@SERIALIZERS.register("name")`` class: utf8 (text.py), pixels, png, jpeg, qa ship here.
Serializers living in another package register through a config's ``plugins:`` list or the
``omnibyte.plugins`` entry point group (see :mod:`omnibyte.registry`).
"""

import importlib
import pkgutil

from . import base  # noqa: F401

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_mod}")
