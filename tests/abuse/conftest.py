"""Fixtures of the abuse tests: tiny sources, calibration text and `.nq` files, built once per module."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def tiny_preset(monkeypatch):
    """A `tiny` preset that converts a 2-layer model in a few seconds (the pipeline tests' recipe)."""
    from converter import pipeline as P
    from presets import tiny_recipe

    recipe = tiny_recipe()
    monkeypatch.setitem(P.PRESETS, "tiny", recipe)
    monkeypatch.setattr(P, "now_utc", lambda: "2026-01-01T00:00:00Z")
    return "tiny"


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint saved by transformers."""
    import hf_tiny

    path = tmp_path_factory.mktemp("src") / "llama"
    hf_tiny.save("llama", path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("".join(rng.choice("ab ") for _ in range(600)))
    return path


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer has one token per byte and ChatML's special tokens."""
    from synthetic_variants import write_text_model

    return write_text_model(tmp_path_factory.mktemp("nq") / "m.nq")
