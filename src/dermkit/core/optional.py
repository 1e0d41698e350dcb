"""Optional dependency groups ("extras"): a missing one fails with the pip line that adds it.

``pip install dermkit`` trains, evaluates and distils classifiers; serving, synthesis,
explanations, exit heads and ONNX export each need an extra (``pyproject.toml``):
``pip install 'dermkit[serve]'``, or ``'dermkit[all]'`` for everything.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

# extra -> the importable modules it provides (the pyproject.toml group, by import name).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "multipart", "httpx", "anyio"),
    "synth": ("diffusers",),
    "explain": ("pytorch_grad_cam",),
    "exits": ("mambapy",),
    "export": ("onnx", "onnxscript", "onnxruntime", "jsonschema"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str) -> ModuleType:
    """Import and return ``module``; if it is not installed, name the extra that provides it.

    Raises:
        MissingExtraError: ``module`` (or a module it imports) is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:  # ModuleNotFoundError, or sys.modules[name] = None
        raise MissingExtraError(_message(module, extra)) from e


def _message(module: str, extra: str) -> str:
    return (
        f"{module} is not installed: it comes with dermkit's {extra!r} extra; "
        f"install it with: pip install 'dermkit[{extra}]' (or 'dermkit[all]')"
    )


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (cheap: no heavy imports)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(*extras: str) -> None:
    """Fail fast, before any work, when a module of a named extra is missing.

    Raises:
        MissingExtraError: naming the first missing module and its extra.
        ValueError: an extra not in :data:`EXTRAS`.
    """
    for extra in extras:
        if extra not in EXTRAS:
            raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")
        for module in EXTRAS[extra]:
            if not installed(module):
                raise MissingExtraError(_message(module, extra))
