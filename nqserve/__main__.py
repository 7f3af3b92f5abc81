"""`python -m nqserve FILE.nq ...`: the same as the `nqserve` command."""
from .cli import main

main()
