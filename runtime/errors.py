"""The one exception the runtime raises for bad input (a malformed request, not a malformed file: that is
nqfmt's NQFormatError). The CLI turns both into one line on stderr and a non-zero exit."""


class NQRunError(ValueError):
    """A request the runtime cannot serve: the message says what and, where it can, how to fix it."""
