"""The merge engine: recipe → inputs → placement → executor → shard loop → method → io/math.

`Merge(recipe, RunOptions(...)).run()` merges; docs/architecture.md draws the flow.
"""

from .options import RunOptions
from .run import Merge, MergeReport

__all__ = ["Merge", "MergeReport", "RunOptions"]
