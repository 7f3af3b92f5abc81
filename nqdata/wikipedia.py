"""The default calibration and evaluation text: English Wikipedia articles from the sample dump in the gensim 4.4.0
wheel, markup stripped with mwparserfromhell, every 4th article held out for evaluation.

A fresh machine has no shared data directory, so the project builds this text itself (pip can download the wheel) and
caches it in the user's cache directory.
"""
from __future__ import annotations

import bz2
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from .cache import cache_dir, write_atomically
from .downloads import DataError, pip_download

WHEEL_REQUIREMENT = "gensim==4.4.0"
DUMP_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 2000
TEST_EVERY = 4
SPLITS = ("train", "test")
# The texts this code builds (spec/EVALUATION.md §1); the cache keeps each version in its own folder, so a machine
# that built an earlier text rebuilds rather than calibrating on it.
TEXT_VERSION = 2
TEXT_SHA256 = {"train": "76fc783df71ddffd5244967d1247f1b7eb745d37986711a83365d86fa1ee8ce8",
               "test": "455da843f48e05523eb8f3726e70a63165bf6cc842c094b7fe0945a481844bb7"}
_DROP_TAGS = {"ref", "table", "gallery", "math", "score", "timeline", "imagemap", "references"}
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
# A table the parser does not see as a tag (one inside another node) survives as lines of its own markup: row and
# cell lines start with one of these; no prose line does.
_TABLE_MARKS = ("{|", "|", "!")


def default_text(split: str) -> Path:
    """Path of the default text for `split` ('train' for calibration, 'test' for evaluation), built on first use."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = cache_dir() / "data" / f"v{TEXT_VERSION}"
    paths = {s: out / f"enwiki-{s}.txt" for s in SPLITS}
    if not all(p.exists() for p in paths.values()):
        texts = split_articles(articles(read_dump(download_wheel())))
        for s, p in paths.items():
            write_atomically(p, texts[s])
    return paths[split]


def download_wheel() -> Path:
    """The gensim wheel (no dependencies) in the cache; it is only read as a zip file."""
    return pip_download(WHEEL_REQUIREMENT, "gensim-4.4.0-*.whl", binary=True)


def read_dump(wheel: Path) -> bytes:
    """The decompressed XML dump inside the wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return bz2.decompress(z.read(DUMP_MEMBER))
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{wheel}: no usable {DUMP_MEMBER}: {e}") from e


def articles(xml: bytes) -> list[tuple[str, str]]:
    """(title, plain text) of every main-namespace, non-redirect page whose wikitext has MIN_ARTICLE_CHARS or more."""
    out = []
    for page in ET.fromstring(xml).iter():
        if not page.tag.endswith("}page"):
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in page}
        if fields["ns"].text != "0" or "redirect" in fields:
            continue
        wikitext = next(el.text or "" for el in page.iter() if el.tag.endswith("}text"))
        if len(wikitext) >= MIN_ARTICLE_CHARS:
            out.append((fields["title"].text, plain_text(wikitext)))
    return out


def plain_text(wikitext: str) -> str:
    """Strip templates, references, tables and file/category links; keep link labels, headings as plain lines.
    Lines of table markup that survive the parser are dropped."""
    import mwparserfromhell  # the parser is pinned: its version changes the text (spec/EVALUATION.md)

    code = mwparserfromhell.parse(wikitext)
    for tpl in code.filter_templates(recursive=False):
        _remove(code, tpl)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).strip().lower() in _DROP_TAGS or str(tag).startswith("{|"):
            _remove(code, tag)
    for link in code.filter_wikilinks(recursive=True):
        if str(link.title).strip().lower().startswith(_DROP_LINK_PREFIXES):
            _remove(code, link)
    text = code.strip_code(normalize=True, collapse=True)
    return "\n".join(ln for ln in (ln.strip() for ln in text.splitlines()) if ln and not ln.startswith(_TABLE_MARKS))


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:
        pass


def split_articles(items: list[tuple[str, str]]) -> dict[str, str]:
    """Every TEST_EVERY-th article (the 4th, 8th, ...) goes to 'test', the rest to 'train'; WikiText-style titles."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, (title, text) in enumerate(items):
        parts["test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"].append(f" = {title} = \n\n{text}\n\n")
    return {s: "".join(p) for s, p in parts.items()}
