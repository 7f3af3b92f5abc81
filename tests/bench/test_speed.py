"""bench/speed.py's decisions: the default-configuration probe and its fallback, the ratios, the --nq labels."""
import signal
import sys

import pytest

from bench import speed
from bench.speed import Engine


def _crashing_cmd(sig):
    return lambda kind, *args: [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(sig)})"]


def test_exit_text():
    assert speed.exit_text(-int(signal.SIGSEGV)) == "killed by SIGSEGV"
    assert speed.exit_text(3) == "exit status 3"


def test_a_crashing_default_falls_back_to_no_repack_and_is_recorded(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(speed, "_worker_cmd", _crashing_cmd(signal.SIGSEGV))
    f = tmp_path / "m-q4_0.gguf"
    f.write_bytes(b"x")
    for requested in ("default", "both"):
        engines, probes = speed.llama_plan([("Q4_0", f)], requested, 2)
        assert [e.llama_config for e in engines] == ["no-repack"]
        assert probes[f.name]["ok"] is False and probes[f.name]["how"] == "killed by SIGSEGV"
        assert "DEFAULT configuration crashed" in capsys.readouterr().err


def test_a_working_default_is_timed_as_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "_worker_cmd", lambda kind, *args: [sys.executable, "-c", "print('{}')"])
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert [e.llama_config for e in speed.llama_plan([("Q4_0", f)], "default", 1)[0]] == ["default"]
    assert [e.llama_config for e in speed.llama_plan([("Q4_0", f)], "both", 1)[0]] == ["default", "no-repack"]
    monkeypatch.setattr(speed, "_worker_cmd", _crashing_cmd(signal.SIGSEGV))
    engines, probes = speed.llama_plan([("Q4_0", f)], "no-repack", 1)  # nothing to probe
    assert [e.llama_config for e in engines] == ["no-repack"] and probes == {}


def test_ratios_against_every_q4_0_configuration():
    ours = Engine("ours:a", "ours", "a.nq", "IQ4_NL")
    q40 = Engine("llama[default]:q.gguf", "llama", "q.gguf", "Q4_0", "default")
    q40n = Engine("llama[no-repack]:q.gguf", "llama", "q.gguf", "Q4_0", "no-repack")
    f16 = Engine("llama[default]:f.gguf", "llama", "f.gguf", "F16", "default")
    best = {ours.label: {"t1": dict(decode_tps=90.0, prefill512_tps=300.0),
                         "t2": dict(decode_tps=135.0, prefill512_tps=500.0)},
            q40.label: {"t1": dict(decode_tps=150.0, prefill512_tps=600.0),
                        "t2": dict(decode_tps=160.0, prefill512_tps=1000.0)},
            q40n.label: {"t1": dict(decode_tps=90.0, prefill512_tps=400.0),
                         "t2": dict(decode_tps=120.0, prefill512_tps=800.0)},
            f16.label: {"t1": dict(decode_tps=30.0, prefill512_tps=100.0),
                        "t2": dict(decode_tps=40.0, prefill512_tps=200.0)}}
    r = speed.ratios([ours, q40, q40n, f16], best, [1, 2])
    assert r["decode t1: ours:a / llama[default]:q.gguf"] == pytest.approx(0.6)
    assert r["decode t2: ours:a / llama[no-repack]:q.gguf"] == pytest.approx(135 / 120)
    assert r["prefill512 t2: ours:a / llama[default]:q.gguf"] == pytest.approx(0.5)
    assert r["decode t2/t1: ours:a"] == pytest.approx(1.5)
    assert not any("f.gguf" in k for k in r) and len(r) == 9


def test_parse_nq_labels(tmp_path):
    f = tmp_path / "quick-iq4.nq"
    f.write_bytes(b"x")
    assert speed.parse_nq([str(f), f"iq4={f}"]) == [("quick-iq4", f), ("iq4", f)]
    with pytest.raises(SystemExit, match="not a file"):
        speed.parse_nq([str(tmp_path / "missing.nq")])


def test_the_llama_build_dir_comes_first_on_the_workers_path_and_is_recorded(monkeypatch, tmp_path):
    """--llama-build DIR: the workers import DIR's llama_cpp, and the JSON names the build they imported."""
    fake = tmp_path / "build" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '9.9.9-test'\n")
    (fake / "llama_cpp.py").write_text("def llama_print_system_info():\n    return b'CPU : AVX512 = 1 | AMX_INT8 = 0 | '\n")
    monkeypatch.setattr(speed, "LLAMA_BUILD", [str(tmp_path / "build")])
    build = speed.llama_build()
    assert build["version"] == "9.9.9-test" and build["path"].startswith(str(fake))
    assert build["system_info"] == "CPU : AVX512 = 1 | AMX_INT8 = 0 |"
