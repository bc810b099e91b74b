"""PLACEHOLDER until merged"""
from __future__ import annotations
import dataclasses
from typing import Callable
@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    module: type
    calibration: str | None = None
    demo: Callable | None = None
    add_cli: Callable | None = None
    description: str = ""
_F = {}
def register(f):
    _F[f.name] = f
    return f
def get(name): return _F[name]
def families(): return tuple(_F.values())
