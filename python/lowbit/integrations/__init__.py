"""Integrations with other libraries, registered without importing them.

``install()`` (run by ``import lowbit``) makes transformers know ``quant_method: "lowbit"``: at once
if transformers' quantizers are already imported, else the moment they are (an import hook), so
``import lowbit`` does not pay for importing transformers (several seconds) when it is not used.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_QUANTIZERS = "transformers.quantizers.auto"


def _register_transformers() -> None:
    """Register lowbit's quantizer; a transformers lowbit cannot work with is warned about, never
    allowed to break the import of transformers itself."""
    try:
        from lowbit.integrations import transformers as integration  # noqa: F401  (registers on import)
    except Exception as exc:  # noqa: BLE001
        import warnings

        warnings.warn(f"lowbit could not register its transformers quantizer ({type(exc).__name__}: {exc}); "
                      "lowbit checkpoints will not load with from_pretrained", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers' quantizer registry so that lowbit's
    quantizer registers right after it executes."""

    def find_spec(self, name, path=None, target=None):
        if name != _QUANTIZERS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            sys.modules[name] = module  # what the registration's own imports will find
            _register_transformers()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if _QUANTIZERS in sys.modules:
        _register_transformers()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
