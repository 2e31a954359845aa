"""The library entry point: a Recipe in, a merged model folder out.

from streammerge import Recipe, Expert, merge
merge(Recipe("ties", "./base", (Expert("./math"), Expert("./code")), "./merged", {"density": 0.2}))
"""

from __future__ import annotations

from .engine import Merge, MergeReport, RunOptions
from .recipe import Recipe


def merge(recipe: Recipe, device: str = "auto", restart: bool = False, quiet: bool = True) -> MergeReport:
    """Run (or resume) a merge; raises a StreammergeError subclass on any failure."""
    merger = Merge(recipe, RunOptions(device=device, restart=restart, quiet=quiet))
    try:
        return merger.run()
    finally:
        merger.close()
