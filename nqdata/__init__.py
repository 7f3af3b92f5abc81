"""nqdata: the project's data on the user's disk: the default text (calibration and evaluation) and the cache
directory every part of the project shares."""
from .cache import cache_dir
from .wikipedia import DataError, default_text

__all__ = ["DataError", "cache_dir", "default_text"]
