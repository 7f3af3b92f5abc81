"""bench/gpu.py without a GPU: its dry run plans every case, and its measured code paths (synthetic model, graph
decode, prefill, the GEMV check) run on the emulating device."""
import numpy as np

from bench import gpu
from emulator import EmulatedDevice
from nqfmt import ModelConfig
from runtime.backends.cuda import CudaBackend


def test_dry_run_plans_every_case(capsys):
    assert gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("gemv ") == 2 * len(gpu.GEMV_SHAPES)
    assert all(name in out for name in gpu.MODELS)


def test_models_part_runs_on_the_emulator():
    be = CudaBackend(EmulatedDevice())
    r = gpu.run_ours(ModelConfig(**gpu.TINY), be, 1.0, prompt=6, new_tokens=[5], prefill=5, sync=lambda: None)
    assert r["decode"]["5"]["timed_tokens"] == 2 and r["decode"]["5"]["tok_s"] > 0
    assert r["prefill"]["tok_s"] > 0 and 0.5 < r["bits_per_weight"] < 1.5


def test_gemv_check_on_the_emulator():
    be = CudaBackend(EmulatedDevice())
    rng = np.random.default_rng(0)
    lin = gpu.random_linear(rng, 70, 99, 1.0)
    x = rng.standard_normal((1, 99)).astype(np.float32)
    assert gpu.gemv_error(be, be.prepare_linear(lin), lin, x) < 1e-6
