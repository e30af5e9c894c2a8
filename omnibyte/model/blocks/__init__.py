"""Stage blocks, registered in ``omnibyte.registry.STAGES`` on import.

A block is ``cls(config, *, dim, layers, max_len, dropout, init_std)`` with ``forward(x (N, T, D),
cache=None) -> (N, T, D)``, causal over T; with a :class:`~omnibyte.model.cache.BlockCache` the T
positions continue the cached ones and the cache is updated. ``layers`` is an nn.ModuleList.
"""

from . import (
    mamba1,  # noqa: F401,E402
    mamba2,  # noqa: F401,E402
    mamba2_ref,  # noqa: F401,E402
    transformer,  # noqa: F401
)
