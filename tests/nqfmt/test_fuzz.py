"""Truncated and mutated files raise NQFormatError (on open, or at the latest on verify): never another exception,
a crash or a hang."""
import numpy as np
import pytest
from synthetic import tiny_config, write_random

from nqfmt import LinearPlan, NQFormatError, open_nq
from nqfmt.keys import GGMLType

ROUNDS = 1200  # per embedding kind


def _must_reject(path) -> str:
    try:
        f = open_nq(path)
        f.verify()
    except NQFormatError as e:
        return str(e)
    pytest.fail(f"a damaged file was accepted: {path}")


# the embedding kinds of spec/FORMAT.md §3.4: dense F16, dense Q4_0 (rows of 32), binary-factored (tied and untied)
KINDS = {
    "f16": (dict(arch="gemma3", sliding_layers=(True,)), {}),
    "q4_0": (dict(arch="qwen2", hidden=64, n_heads=4, head_dim=16), dict(embedding_type=GGMLType.Q4_0)),
    "binary": (dict(arch="gemma3", sliding_layers=(True,)), dict(embedding_type=LinearPlan((20, 7), has_mid=True))),
    "binary-untied": (dict(arch="qwen2"), dict(embedding_type=LinearPlan((20,)), output_type=LinearPlan((9,)))),
}


@pytest.fixture(scope="module", params=list(KINDS))
def original(tmp_path_factory, request):
    config, kinds = KINDS[request.param]
    path = tmp_path_factory.mktemp("fuzz") / "orig.nq"
    write_random(path, tiny_config(n_layers=1, **config), ranks=(20,), has_mid=True, **kinds)
    return path.read_bytes()


def test_mutations_and_truncations_are_always_format_errors(original, tmp_path):
    rng = np.random.default_rng(2026)
    path = tmp_path / "fuzzed.nq"
    header_end = original.index(b"nanoquant.checksums") + 64
    messages = set()
    for i in range(ROUNDS):
        data = bytearray(original)
        kind = i % 4
        if kind == 0:  # truncate anywhere
            data = data[:rng.integers(0, len(data))]
        elif kind == 1:  # one byte anywhere, to a different value
            at = rng.integers(0, len(data))
            data[at] = (data[at] + rng.integers(1, 256)) % 256
        elif kind == 2:  # a few bytes in the header, where parsing happens
            for at in rng.integers(0, header_end, size=rng.integers(1, 4)):
                data[at] = (data[at] + rng.integers(1, 256)) % 256
        else:  # a run of random bytes, possibly extending the file
            at = rng.integers(0, len(data))
            run = rng.integers(0, 256, size=rng.integers(1, 64), dtype=np.uint8).tobytes()
            data[at:at + len(run)] = run
            if bytes(data) == original:
                continue
        path.write_bytes(bytes(data))
        messages.add(_must_reject(path).split(":")[0][:40])
    assert len(messages) > 3  # the errors name different things, not one catch-all


def test_appended_bytes_are_rejected(original, tmp_path):
    path = tmp_path / "long.nq"
    path.write_bytes(original + b"\0" * 64)
    assert "trailing bytes" in _must_reject(path)
