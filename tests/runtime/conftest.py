"""Shared fixtures for the runtime tests."""
from __future__ import annotations

import pytest

from synthetic_variants import VARIANTS, write_variant


@pytest.fixture(scope="session")
def variant_files(tmp_path_factory):
    """Every variant written once per test session."""
    root = tmp_path_factory.mktemp("variants")
    return {v: write_variant(root / f"{v}.nq", v) for v in VARIANTS}
