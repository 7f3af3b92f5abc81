"""The second calibration text (a public-domain novel) is built from the sentencepiece sdist on a fresh machine."""
import hashlib

import pytest

from nqdata import DataError
from nqdata.fiction import TEXT_SHA256, book_body, fiction_text


def test_keeps_the_book_and_drops_gutenbergs_header_and_licence():
    page = ("\ufeffProject Gutenberg's Book, by Someone\nlicence words\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "Produced by Volunteers\nTITLE\nFirst line.\n--(THE END)--\n[A: erratum]\nEnd of Project Gutenberg's Book\n")
    assert book_body(page.lstrip("\ufeff")) == "TITLE\nFirst line.\n--(THE END)--\n"
    with pytest.raises(DataError):
        book_body("no marks at all\n")


def test_builds_from_the_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOQUANT_CACHE", str(tmp_path))
    path = fiction_text()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("BOTCHAN (MASTER DARLING)\n") and text.endswith("--(THE END)--\n")
    assert "Gutenberg" not in text
    assert hashlib.sha256(path.read_bytes()).hexdigest() == TEXT_SHA256
    assert fiction_text() == path  # cached: no second download
