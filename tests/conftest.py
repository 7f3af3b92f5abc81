"""Test helpers (synthetic.py, converter/hf_tiny.py, runtime/hf_reference.py, ...) import by module name; pytest runs in
importlib mode because test files in different folders share basenames."""
import sys
from pathlib import Path

_HERE = Path(__file__).parent
for folder in (_HERE, _HERE / "converter", _HERE / "runtime"):
    sys.path.insert(0, str(folder))
