"""nqdata: the project's default text (calibration and evaluation), shared by the converter and the runtime."""
from .wikipedia import DataError, cache_dir, default_text

__all__ = ["DataError", "cache_dir", "default_text"]
