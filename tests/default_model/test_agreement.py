"""Three implementations of the default model agree: the runtime's float64 numpy reference, its numba backend, and
the converter's torch model of the same `.nq` file; and the runtime's tokenizer equals transformers' GGUF tokenizer on
the text the perplexity protocol scores (spec/EVALUATION.md §5)."""
import numpy as np
import torch

import runtime
from converter.torch_model import load_nq
from nqdata import default_text
from nqfmt import open_nq
from runtime.generate import GenerationStats
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import Tokenizer

PROMPT = "The history of the city begins in the early medieval period, when a small settlement grew"
SAMPLES = ["The capital of France is Paris.", "In 1987, 3.14159 × 2 = 6.28318; 1,234,567 people.",
           "naïve café – Ünïcödé “quotes” — 東京 ☃ 🙂", "  leading spaces\tand\ttabs\n\nnew lines  ",
           "<|im_start|>user\nHi<|im_end|>\n", "don't won't it's 'quoted' \"double\"", "x" * 50 + " 00000000001"]


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def greedy(m: runtime.LanguageModel, ids: list[int], tokens: int) -> list[int]:
    """Exactly `tokens` greedy tokens (stop tokens included: the comparison is of the argmax sequence)."""
    return list(m.generator.tokens(ids, tokens, Sampler(SamplingParams(temperature=0)), frozenset(),
                                   GenerationStats()))


def test_numpy_reference_equals_the_converters_torch_model_and_numba_equals_it(default_nq):
    ref = runtime.load(default_nq, backend="numpy")
    ids = ref.tokenize(PROMPT)
    ours = ref.logits(ids)
    with torch.no_grad():
        theirs = load_nq(default_nq)(torch.tensor(ids)[None]).numpy().reshape(ours.shape)
    fast = runtime.load(default_nq, backend="numba", threads=1, exact=True).logits(ids)
    assert rel_diff(ours, theirs) < 1e-3
    assert rel_diff(fast, ours) < 1e-4


def test_greedy_tokens_identical_on_numpy_and_numba(default_nq):
    models = {name: runtime.load(default_nq, backend=name, threads=1, exact=True) for name in ("numpy", "numba")}
    ids = models["numba"].tokenize(PROMPT)
    assert greedy(models["numpy"], ids, 32) == greedy(models["numba"], ids, 32)


def test_runtime_tokenizer_equals_transformers_on_samples_and_the_test_text(default_nq, hf_tokenizer):
    ours = Tokenizer(open_nq(default_nq).tokenizer)
    texts = SAMPLES + [default_text("test").read_text(encoding="utf-8")[:200_000]]
    for text in texts:
        assert ours.encode(text, add_bos=False) == hf_tokenizer.encode(text, add_special_tokens=False), text[:40]
