"""The default text is built from the gensim wheel on a fresh machine (needs PyPI, as the install does)."""
import hashlib
from pathlib import Path

import pytest

import nqdata
from nqdata.wikipedia import TEXT_SHA256, plain_text, split_articles

SHARED = Path(__file__).parents[3] / "shared" / "data"


def test_markup_is_stripped():
    wikitext = ("'''Foo''' is a [[bar|baz]] thing.{{cite web|url=x}}<ref>note</ref>\n"
                "[[File:x.png|thumb|caption]]\n== History ==\nText [[Category:Things]]")
    assert plain_text(wikitext) == "Foo is a baz thing.\nHistory\nText"


def test_every_fourth_article_is_held_out():
    items = [(f"T{i}", f"body {i}") for i in range(8)]
    parts = split_articles(items)
    assert parts["test"] == " = T3 = \n\nbody 3\n\n = T7 = \n\nbody 7\n\n"
    assert " = T0 = " in parts["train"] and " = T3 = " not in parts["train"]


def test_builds_from_the_wheel_and_matches_the_reference_test_text(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOQUANT_CACHE", str(tmp_path))
    test_path = nqdata.default_text("test")
    train_path = nqdata.default_text("train")
    test_text = test_path.read_text(encoding="utf-8")
    assert test_text.startswith(" = A = \n\n") and test_text.count("\n = ") == 24
    assert " = Anarchism = " in train_path.read_text(encoding="utf-8") and " = Anarchism = " not in test_text
    if (SHARED / "enwiki-test.txt").exists():
        assert test_text == (SHARED / "enwiki-test.txt").read_text(encoding="utf-8")
    train_lines = train_path.read_text(encoding="utf-8").splitlines()
    assert not [ln for ln in train_lines if ln.startswith(("{|", "|", "!"))]  # no wikitable markup survives
    for path, split in ((train_path, "train"), (test_path, "test")):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == TEXT_SHA256[split]
    with pytest.raises(ValueError):
        nqdata.default_text("validation")
