"""Truncated and mutated files raise NQFormatError (on open, or at the latest on verify): never another exception,
a crash or a hang."""
import numpy as np
import pytest
from synthetic import tiny_config, write_random

from nqfmt import NQFormatError, open_nq

ROUNDS = 2400


def _must_reject(path) -> str:
    try:
        f = open_nq(path)
        f.verify()
    except NQFormatError as e:
        return str(e)
    pytest.fail(f"a damaged file was accepted: {path}")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "orig.nq"
    write_random(path, tiny_config("gemma3", n_layers=1, sliding_layers=(True,)), ranks=(20,), has_mid=True)
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
