"""streammerge: out-of-core merging of fine-tuned models, OrthoMerge included."""

from .api import merge
from .errors import StreammergeError
from .recipe import Expert, Recipe

__version__ = "0.1.0"
__all__ = ["Expert", "Recipe", "StreammergeError", "merge", "__version__"]
