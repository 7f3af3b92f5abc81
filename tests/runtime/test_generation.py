"""Generation, sampling, streaming, chat and the library API, on a tiny byte-tokenizer model."""
import subprocess
import sys

import numpy as np
import pytest

import runtime
from runtime import NQRunError
from runtime.sampling import Sampler, SamplingParams, top_k
from runtime.tokenizer import TextStream
from synthetic_variants import write_text_model


@pytest.fixture(scope="module")
def text_model_path(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("text") / "text.nq")


@pytest.fixture(scope="module")
def model(text_model_path):
    return runtime.load(text_model_path, backend="numba", threads=1)


def test_runtime_never_imports_torch_or_transformers(text_model_path):
    code = ("import sys, runtime; m = runtime.load(sys.argv[1]); m.generate('ab', max_tokens=3); "
            "bad = [k for k in ('torch', 'transformers') if k in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(text_model_path)], check=True)


def test_greedy_generation_identical_across_backends(text_model_path):
    outs = []
    for backend in ("numpy", "numba"):
        m = runtime.load(text_model_path, backend=backend, threads=1)
        ids = list(m.generator.tokens(m.tokenize("The cat"), 40, Sampler(SamplingParams(temperature=0)),
                                      frozenset(), runtime.GenerationStats()))
        outs.append(ids)
    assert outs[0] == outs[1] and len(outs[0]) == 40


def test_stream_pieces_join_to_generate_and_stats(model):
    pieces = list(model.stream("hello", max_tokens=25, temperature=0))
    stats = model.stats
    assert "".join(pieces) == model.generate("hello", max_tokens=25, temperature=0)
    assert stats.prompt_tokens == 5 and stats.generated_tokens + (stats.stop_reason == "stop token") >= 1
    assert stats.stop_reason in ("max tokens", "stop token")


def test_stop_string_cuts_the_output(model):
    full = model.generate("hello", max_tokens=30, temperature=0)
    assert len(full) > 4
    stop = full[2:4]
    cut = model.generate("hello", max_tokens=30, temperature=0, stop=[stop])
    assert cut == full[:full.find(stop)] and model.stats.stop_reason == "stop string"


def test_seed_makes_sampling_reproducible(model):
    a = model.generate("x", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    b = model.generate("x", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    c = model.generate("x", max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=8)
    assert a == b and a != c


def test_sampler_filters():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(101) * 3
    best = int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=0))(logits) == best
    for params in (dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0)):
        picks = {Sampler(SamplingParams(temperature=5.0, seed=s, **params))(logits) for s in range(20)}
        assert picks == {best}, params
    top3 = set(np.argsort(-logits)[:3].tolist())
    picks = {Sampler(SamplingParams(temperature=50.0, top_k=3, top_p=1.0, min_p=0.0, seed=s))(logits)
             for s in range(200)}
    assert picks == top3
    # repetition penalty: a strong one moves greedy off an already-seen best token
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1e6))(logits, [best]) != best


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_logit_is_an_error(text_model_path, monkeypatch, bad):
    m = runtime.load(text_model_path, backend="numba", threads=1)
    real = m.model.backend.head

    def head(table, x):
        out = real(table, x)
        out[..., 7] = bad
        return out
    monkeypatch.setattr(m.model.backend, "head", head)
    with pytest.raises(NQRunError, match="not finite"):
        m.generate("ab", max_tokens=2)


def float64_rule(params: SamplingParams, rng: np.random.Generator, logits: np.ndarray, context: list[int]) -> int:
    """The sampling rule written the obvious way: every logit in float64, the penalty, the temperature, a stable
    sort of the whole vocabulary, then top-k, top-p and min-p."""
    z = logits.astype(np.float64)
    if params.repetition_penalty != 1.0 and context:
        seen = np.unique(context)
        z[seen] = np.where(z[seen] > 0, z[seen] / params.repetition_penalty, z[seen] * params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(z))
    z = z / params.temperature
    ids = np.argsort(-z, kind="stable")
    if params.top_k:
        ids = ids[:params.top_k]
    probs = np.exp(z[ids] - z[ids[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        ids, probs = ids[:keep], probs[:keep]
    if params.min_p > 0:
        mask = probs >= params.min_p * probs[0]
        ids, probs = ids[mask], probs[mask]
    probs /= probs.sum()
    return int(ids[rng.choice(len(ids), p=probs)])


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=0, repetition_penalty=1.3), dict(),
                                    dict(temperature=1.7, top_k=0, top_p=1.0, min_p=0.0),
                                    dict(temperature=0.6, top_k=7, top_p=0.9, min_p=0.0, repetition_penalty=1.2),
                                    dict(temperature=1.0, top_k=300, top_p=0.99, min_p=0.01)])
def test_sampler_draws_what_the_float64_rule_draws(params):
    """The sampler widens only its candidates to float64: float32 logits (as the backends give them) draw the same
    tokens as the whole-vocabulary float64 rule, seed for seed."""
    rng = np.random.default_rng(4)
    for seed in range(40):
        logits = (rng.standard_normal(1003) * rng.uniform(0.5, 6)).astype(np.float32)
        context = rng.integers(0, 1003, 30).tolist()
        params_ = SamplingParams(seed=seed, **params)
        want = float64_rule(params_, np.random.default_rng(seed), logits, context)
        assert Sampler(params_)(logits, context) == want


def test_top_k_is_the_head_of_a_stable_sort():
    """top_k's candidates (logits at or above the k-th largest group maximum) hold the k largest logits, in the
    order a stable sort of −logits gives, ties by lower id: vocabularies of every size against 64 groups, tied
    integer logits and continuous ones, k up to the whole vocabulary."""
    rng = np.random.default_rng(11)
    for trial in range(400):
        n = int(rng.integers(1, 70000)) if trial % 4 == 0 else int(rng.integers(1, 3000))
        k = int(rng.integers(1, min(n, 300) + 1)) if trial % 5 else n
        logits = (rng.integers(-6, 6, n) if trial % 2 else rng.standard_normal(n) * 4).astype(np.float32)
        assert np.array_equal(top_k(logits, k), np.argsort(-logits, kind="stable")[:k]), (n, k)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(min_p=2),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_values(bad):
    with pytest.raises(NQRunError):
        SamplingParams(**bad)


def test_text_stream_waits_for_whole_characters(model):
    stream = TextStream(model.tokenizer)
    ids = model.tokenize("é€x")  # 2 + 3 + 1 bytes, one token each
    pieces = [stream.push(i) for i in ids]
    assert pieces == ["", "é", "", "", "€", "x"] and stream.flush() == ""


def test_chat_reuses_the_cached_prefix(model):
    messages = [{"role": "user", "content": "hi there"}]
    reply = model.chat(messages, max_tokens=8, temperature=0)
    first = model.stats
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
    model.chat(messages, max_tokens=8, temperature=0)
    assert first.prefill_tokens == first.prompt_tokens
    assert model.stats.prefill_tokens < model.stats.prompt_tokens
    # the cached continuation gives the same logits as a fresh computation
    ids = model.chat_prompt(messages)
    fresh = runtime.load(model.info.path, backend="numba", threads=1).logits(ids)[-1]
    logits, _ = model.generator.prefill(ids)
    np.testing.assert_allclose(logits[-1], fresh, rtol=0, atol=1e-4 * np.abs(fresh).max())


def test_chat_template_renders_chatml(model):
    ids = model.chat_prompt([{"role": "user", "content": "ok"}])
    assert model.tokenizer.decode(ids, skip_special=False) == "<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n"


def test_logits_match_the_reference_backend(text_model_path, model):
    ids = model.tokenize("abc xyz")
    want = runtime.load(text_model_path, backend="numpy").logits(ids)
    exact = runtime.load(text_model_path, backend="numba", threads=1, exact=True).logits(ids)
    assert exact.shape == (7, 259) and np.abs(exact - want).max() <= 1e-4 * np.abs(want).max()
    # the default rounds the binary linears' inputs to 11 bits where the fixed-point kernels run
    # (tests/runtime/test_fixed_linear.py bounds each product); a random model amplifies that through 2 blocks
    got = model.logits(ids)
    tolerance = 1e-2 if model.backend.fixed_linears else 1e-4
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()


def test_context_limits(text_model_path):
    m = runtime.load(text_model_path, backend="numba", threads=1, n_ctx=12)
    with pytest.raises(NQRunError, match="context holds 12"):
        m.generate("x" * 12, max_tokens=2)
    m.generate("x" * 8, max_tokens=50, temperature=0)
    # every token but the last generated one is run, so prompt + generated fills the context plus one
    assert (m.stats.stop_reason, m.stats.prompt_tokens + m.stats.generated_tokens) == ("context full", 13)
    with pytest.raises(NQRunError):
        runtime.load(text_model_path, n_ctx=10_000)


def test_info(model):
    info = model.info
    assert (info.arch, info.n_layers, info.vocab, info.backend, info.threads) == ("llama", 2, 259, "numba", 1)
    assert "llama" in str(info)


def test_stop_string_split_across_tokens_is_held_back(model):
    """Text that may begin a stop string is not emitted until it is clear; the stop string itself never is."""
    from runtime.generate import GenerationStats, text_pieces
    ids = model.tokenize("abc<END>xyz")

    def pieces(stop):
        return list(text_pieces((i for i in ids), model.tokenizer, stop, GenerationStats()))

    got = pieces(("<END>",))
    assert "".join(got) == "abc" and all("<" not in p for p in got)
    assert "".join(pieces(("<EN!",))) == "abc<END>xyz"  # a partial match that fails is released in order


def test_repl_survives_a_turn_that_overflows_the_context(text_model_path):
    from typer.testing import CliRunner

    from runtime.cli import _app, run
    result = CliRunner().invoke(_app(run), [str(text_model_path), "--chat", "--ctx", "40", "-n", "3",
                                            "--temperature", "0"], input="x" * 60 + "\nhi\n")
    assert result.exit_code == 0
    assert "context holds 40" in result.stderr and result.stdout.count("> ") == 3
