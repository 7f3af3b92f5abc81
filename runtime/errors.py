"""The one exception the runtime raises for bad input (a malformed request, not a malformed file: that is
nqfmt's NQFormatError). Both are `nqfmt.NQError`s, which every command turns into one line and exit status 1."""
from nqfmt.errors import NQError


class NQRunError(NQError):
    """A request the runtime cannot serve: the message says what and, where it can, how to fix it."""
