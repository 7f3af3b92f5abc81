"""nqdata: the project's data on the user's disk: the default texts (calibration and evaluation) and the cache
directory every part of the project shares."""
from .cache import cache_dir
from .downloads import DataError
from .fiction import fiction_text
from .wikipedia import default_text

__all__ = ["DataError", "cache_dir", "default_text", "fiction_text"]
