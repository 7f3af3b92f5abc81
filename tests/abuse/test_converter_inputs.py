"""Finding 6: the converter checks its inputs before any work. NaN/Inf or integer weights, a config.json that is not an
object or states impossible sizes, a seed beyond 63 bits and more threads than cores are each one error line, and
leave no work directory behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from converting import nqconvert, one_line
from craft import REPO, TIMEOUT, command, limited, one_error_line

WEIGHT = "model.layers.1.mlp.down_proj.weight"


def source_copy(tmp_path, hf_source):
    src = tmp_path / "src"
    shutil.copytree(hf_source, src)
    return src


def edit_weights(src, edit) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def edit_config(src, edit) -> None:
    path = src / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def convert_to(out, src, calib, *extra):
    return nqconvert(src, out, "--preset", "tiny", "--calib", calib, "--threads", "1", *extra)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_up_front_naming_the_tensor(tmp_path, hf_source, calib, tiny_preset, bad):
    src = source_copy(tmp_path, hf_source)

    def poison(tensors):
        tensors[WEIGHT][3, 5] = bad

    edit_weights(src, poison)
    result = convert_to(tmp_path / "m.nq", src, calib)
    one_line(result, WEIGHT, "NaN or infinite")
    assert "calibration" not in result.stderr  # before any work
    assert not list(tmp_path.glob("m.nq*"))


def test_integer_weights_are_refused(tmp_path, hf_source, calib, tiny_preset):
    src = source_copy(tmp_path, hf_source)

    def to_int(tensors):
        tensors[WEIGHT] = (tensors[WEIGHT] * 100).to(torch.int32)

    edit_weights(src, to_int)
    one_line(convert_to(tmp_path / "m.nq", src, calib), WEIGHT, "I32")
    assert not list(tmp_path.glob("m.nq*"))


@pytest.mark.parametrize("edit,needle", [
    (lambda cfg: [cfg], "not a JSON object"),
    (lambda cfg: {**cfg, "num_hidden_layers": 1e8}, "num_hidden_layers"),
    (lambda cfg: {**cfg, "num_hidden_layers": 3}, "num_hidden_layers"),
    (lambda cfg: {**cfg, "vocab_size": 10**12}, "vocab_size"),
    (lambda cfg: {**cfg, "hidden_size": True}, "hidden_size"),
])
def test_impossible_configs_are_one_line(tmp_path, hf_source, calib, tiny_preset, edit, needle):
    src = source_copy(tmp_path, hf_source)
    edit_config(src, edit)
    one_line(convert_to(tmp_path / "m.nq", src, calib), needle)
    assert not list(tmp_path.glob("m.nq*"))


def test_a_hundred_million_layers_cost_neither_memory_nor_time(tmp_path, hf_source, calib):
    """A config.json claiming 10^8 layers is refused from the weights' tensor count, before transformers (which
    builds per-layer lists) reads it: under the address-space limit and the timeout."""
    src = source_copy(tmp_path, hf_source)
    edit_config(src, lambda cfg: {**cfg, "model_type": "qwen2", "num_hidden_layers": 100_000_000})
    one_error_line(command("nqconvert", src, tmp_path / "m.nq", "--calib", calib), "nqconvert", "num_hidden_layers")
    assert not list(tmp_path.glob("m.nq*"))


@pytest.mark.parametrize("args,needle", [
    (("--seed", str(2**64)), "--seed"), (("--seed", "-1"), "--seed"), (("--threads", "1000"), "--threads 1000"),
    (("--threads", "0"), "--threads 0"),
])
def test_settings_no_run_can_use_are_one_line(tmp_path, hf_source, calib, tiny_preset, args, needle):
    result = nqconvert(hf_source, tmp_path / "m.nq", "--preset", "tiny", "--calib", calib, *args)
    one_line(result, needle)
    assert not list(tmp_path.glob("m.nq*"))


def test_a_padding_setting_in_the_sources_tokenizer_is_dropped(tmp_path, hf_source):
    """A tokenizer.json padding every text to 2^31 tokens (the library allocated 8 GiB and aborted): the source's
    tokenizer encodes text to its own tokens (in a subprocess: the old behaviour killed the process)."""
    src = source_copy(tmp_path, hf_source)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["padding"] = {"strategy": {"Fixed": 2**31}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "a"}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}]; from converter.sources import open_source; "
            f"print(len(open_source({str(src)!r}).hf_tokenizer().encode('abba').ids))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT, preexec_fn=limited)
    assert done.returncode == 0 and int(done.stdout) < 10, done.stderr.decode()[-2000:]
