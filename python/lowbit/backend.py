"""The backend-selection rule, shared by every lowbit op: see ``lowbit.ops._contract``.

``backend=`` argument, else the environment variable ``LOWBIT_BACKEND``, else ``auto``; names:
``auto``, ``cuda``, ``triton``, ``cpu``, ``reference``. This module re-exports the rule's functions.
"""

from lowbit.ops._contract import (  # noqa: F401
    AUTO_ORDER,
    BACKENDS,
    available,
    clear_cache,
    implementations,
    op,
    requested,
    resolve,
    why_unavailable,
)
