"""streammerge: out-of-core merging of fine-tuned models, OrthoMerge included."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Expert", "Recipe", "StreammergeError", "merge", "__version__"]

if TYPE_CHECKING:
    from .api import merge
    from .errors import StreammergeError
    from .recipe import Expert, Recipe

# Imported when first used (PEP 562): `import streammerge` alone stays light, so the command's
# entry point (console.py) can answer Ctrl-C during the heavy imports (torch) itself.
_LAZY = {"merge": "api", "StreammergeError": "errors", "Expert": "recipe", "Recipe": "recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
