"""Drop-in replacements for ``torch.nn.Linear`` that run from compressed weights, and the
``LowbitLinear`` protocol they share (``lowbit.nn.base``).

The families' modules (``DFloatLinear``, ``Int8Linear``, ...) are looked up by class name among
the registered families, so a new family is found here without editing this file.
"""

from lowbit.nn.base import LowbitLinear


def _modules() -> dict:
    from lowbit import registry

    return {family.module.__name__: family.module for family in registry.families()}


def __getattr__(name: str):
    module = _modules().get(name)
    if module is None:
        raise AttributeError(f"module 'lowbit.nn' has no attribute {name!r}")
    return module


def __dir__():
    return sorted(["LowbitLinear", *_modules()])
