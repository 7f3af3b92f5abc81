"""Finding 3: the file's tokenizer.json is checked before the tokenizers library loads it, and whatever that library
raises (a Rust panic, a bare Exception at encode time) becomes one line; a padding or truncation setting cannot make
it allocate gigabytes or change a prompt."""
from __future__ import annotations

import json

import pytest

from bench.synthetic_model import byte_tokenizer_json
from craft import command, one_error_line, rewrite
from nqfmt import keys as K
from synthetic_variants import SPECIAL


def tokenizer(**over) -> str:
    tok = json.loads(byte_tokenizer_json(SPECIAL))
    tok.update(over)
    return json.dumps(tok)


CASES = {
    "rust panic": tokenizer(normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAA"}),
    "unknown at encode": tokenizer(model={"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                                          "max_input_chars_per_word": 100, "vocab": {"a": 0}}),
    "not json": "{\"model\": ",
    "a list": "[1, 2, 3]",
    "no model": json.dumps({"version": "1.0"}),
    "model type": tokenizer(model={"type": "Mystery", "vocab": {}}),
    "id beyond u32": byte_tokenizer_json(SPECIAL).replace('"id": 256', f'"id": {2**32}'),
    "deep nesting": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("name", CASES)
def test_a_broken_tokenizer_is_one_line(text_model, tmp_path, name):
    path = rewrite(text_model, tmp_path / "m.nq", meta={K.TOKENIZER_JSON: CASES[name]})
    one_error_line(command("nqrun", path, "-p", "hi", "-n", "2", "--backend", "numpy"), "nqrun", "tokenizer")


@pytest.mark.parametrize("setting", [
    {"padding": {"strategy": {"Fixed": 2**31}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                 "pad_type_id": 0, "pad_token": "a"}},
    {"truncation": {"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0}},
])
def test_padding_and_truncation_settings_are_ignored(text_model, tmp_path, setting):
    """The runtime encodes one text at a time and never pads or truncates it: a fixed padding of 2^31 (which made
    the library allocate 8 GiB and abort) and a truncation to one token change nothing."""
    path = rewrite(text_model, tmp_path / "m.nq", meta={K.TOKENIZER_JSON: tokenizer(**setting)})
    done = command("nqrun", path, "-p", "hello", "-n", "3", "--temperature", "0", "--backend", "numpy")
    plain = command("nqrun", text_model, "-p", "hello", "-n", "3", "--temperature", "0", "--backend", "numpy")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout == plain.stdout
