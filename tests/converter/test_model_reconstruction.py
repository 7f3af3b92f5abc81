"""The teacher's top-k cache and the coarsened KL against float64 references on random logits."""
import torch

from converter.model_reconstruction import coarse_kl, next_token_ce, teacher_cache


def _head(weight: torch.Tensor):
    return lambda h: h @ weight.T


def test_teacher_cache_matches_float64_topk_and_tail_across_uneven_batches():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(97, 19, generator=gen)
    hidden = torch.randn(7, 13, 19, generator=gen)
    cache = teacher_cache(_head(weight), hidden, k=11, batch=3)
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    top = torch.topk(logp, 11, dim=-1)
    assert cache.logp.shape == (7, 13, 11) and cache.ids.dtype == torch.int32
    torch.testing.assert_close(cache.logp.double(), top.values, rtol=0, atol=1e-5)
    assert torch.equal(cache.ids.long(), top.indices)
    tail = 1 - top.values.exp().sum(-1)  # float32 sums leave ~1e-7 absolute error in this mass
    torch.testing.assert_close(cache.log_tail.double().exp(), tail, rtol=0, atol=1e-6)


def test_teacher_cache_keeps_the_whole_vocabulary_when_k_exceeds_it():
    weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    cache = teacher_cache(_head(weight), torch.randn(2, 3, 4), k=64, batch=1)
    assert cache.logp.shape == (2, 3, 5)
    torch.testing.assert_close(cache.logp.exp().sum(-1), torch.ones(2, 3))


def test_coarse_kl_is_the_float64_kl_of_the_coarsened_distributions():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(53, 9, generator=gen)
    hidden = torch.randn(3, 6, 9, generator=gen)
    cache = teacher_cache(_head(weight), hidden, k=7, batch=2)
    student = torch.randn(3, 6, 53, generator=gen)
    logq = torch.log_softmax(student.double(), dim=-1)
    ids = cache.ids.long()
    q_top = logq.gather(-1, ids).exp()
    q_tail = 1 - q_top.sum(-1)
    p_top = cache.logp.double().exp()
    p_tail = cache.log_tail.double().exp()
    expected = ((p_top * (p_top / q_top).log()).sum(-1) + p_tail * (p_tail / q_tail).log()).mean()
    got = coarse_kl(torch.log_softmax(student, dim=-1), cache.logp, cache.ids, cache.log_tail)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    teacher_logits = hidden @ weight.T
    assert abs(float(coarse_kl(torch.log_softmax(teacher_logits, dim=-1), cache.logp, cache.ids, cache.log_tail))) < 1e-5


def test_coarse_kl_gradient_matches_the_float64_masked_logsumexp_form():
    """The tail taken as 1 − top-k mass must give the gradient of the exact form (tail = log-sum-exp outside top-k)."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(61, 11, generator=gen)
    cache = teacher_cache(_head(weight), torch.randn(2, 5, 11, generator=gen), k=9, batch=2)
    student = torch.randn(2, 5, 61, generator=gen)
    exact = student.double().requires_grad_()
    logq = torch.log_softmax(exact, dim=-1)
    ids = cache.ids.long()
    q_tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1)
    p_top, p_tail = cache.logp.double(), cache.log_tail.double()
    kl = ((p_top.exp() * (p_top - logq.gather(-1, ids))).sum(-1) + p_tail.exp() * (p_tail - q_tail)).mean()
    kl.backward()
    fast = student.clone().requires_grad_()
    coarse_kl(torch.log_softmax(fast, dim=-1), cache.logp, cache.ids, cache.log_tail).backward()
    torch.testing.assert_close(fast.grad.double(), exact.grad, rtol=1e-4, atol=1e-7)


def test_teacher_cache_in_bfloat16_stays_close_to_float32():
    """The bf16 teacher: same layout and dtypes, log-probs within bfloat16's rounding of the logits."""
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(97, 19, generator=gen)
    hidden = torch.randn(4, 13, 19, generator=gen)
    exact = teacher_cache(_head(weight), hidden, k=11, batch=3)
    bf16 = teacher_cache(_head(weight), hidden, k=11, batch=3, bf16=True)
    assert bf16.logp.dtype == torch.float32 and bf16.ids.dtype == torch.int32
    assert not torch.equal(bf16.logp, exact.logp)  # bfloat16 really ran
    torch.testing.assert_close(bf16.logp, exact.logp, rtol=0, atol=0.15)


def test_next_token_ce_is_the_float64_mean_negative_log_likelihood_of_each_next_token():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 7, 41, generator=gen)
    tokens = torch.randint(0, 41, (3, 7), generator=gen, dtype=torch.int32)
    logq = torch.log_softmax(logits.double(), dim=-1)
    expected = -sum(float(logq[b, t, tokens[b, t + 1]]) for b in range(3) for t in range(6)) / 18
    assert abs(float(next_token_ce(torch.log_softmax(logits, dim=-1), tokens)) - expected) < 1e-5
