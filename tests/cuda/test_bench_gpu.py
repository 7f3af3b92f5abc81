"""bench/gpu.py without a GPU: its dry run plans every case, and its measured code paths (synthetic model, graph
decode, prefill, the GEMV check) run on the emulating device."""
import numpy as np
import pytest

from bench import gpu
from emulator import EmulatedDevice
from nqfmt import ModelConfig
from runtime.backends.cuda import CudaBackend


def test_dry_run_plans_every_case(capsys):
    assert gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("gemv ") == 2 * len(gpu.GEMV_SHAPES)
    assert all(name in out for name in gpu.MODELS)


@pytest.mark.parametrize("table,hidden", [("f16", 72), ("iq4_nl+3072", 96)])
def test_models_part_runs_on_the_emulator(table, hidden):
    be = CudaBackend(EmulatedDevice())
    cfg = ModelConfig(**{**gpu.TINY, "hidden": hidden})
    r = gpu.run_ours(cfg, be, 1.0, prompt=6, new_tokens=[5], prefill=5, sync=lambda: None, table=table)
    assert r["decode"]["5"]["timed_tokens"] == 2 and r["decode"]["5"]["tok_s"] > 0
    assert r["prefill"]["tok_s"] > 0 and 0.5 < r["bits_per_weight"] < 1.5 and r["table"] == table


def test_random_hot_table_matches_the_reference_on_the_emulator():
    """The synthetic model's default table kind, through the cuda backend, against the float64 numpy reference."""
    from runtime.backends.numpy_ref import NumpyBackend
    cfg = ModelConfig(**{**gpu.TINY, "hidden": 96})
    ours = gpu.random_table(np.random.default_rng(2), cfg, CudaBackend(EmulatedDevice()), "iq4_nl+3072")
    ref = gpu.random_table(np.random.default_rng(2), cfg, NumpyBackend(), "iq4_nl+3072")
    x = np.random.default_rng(3).standard_normal((3, 96))
    be = CudaBackend(EmulatedDevice())
    got, want = be.head(ours, x), NumpyBackend().head(ref, x)
    assert np.all(np.isfinite(got)) and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_gemv_check_on_the_emulator():
    be = CudaBackend(EmulatedDevice())
    rng = np.random.default_rng(0)
    lin = gpu.random_linear(rng, 70, 99, 1.0)
    x = rng.standard_normal((1, 99)).astype(np.float32)
    assert gpu.gemv_error(be, be.prepare_linear(lin), lin, x) < 1e-6
