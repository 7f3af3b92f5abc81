"""The one exception a malformed `.nq` file turns into."""


class NQFormatError(ValueError):
    """A `.nq` file (or a plan to write one) breaks the format: the message names the key or tensor and what is wrong."""
