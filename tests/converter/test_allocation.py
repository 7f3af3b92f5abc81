"""Ranks where they matter: the Fisher rule's error estimate, its greedy allocation at a fixed total of bits, and a
conversion that uses it."""
import pytest
import torch

import hf_tiny
from converter import pipeline as P
from converter.allocation import effective_rank, error_tail, fisher_ranks, last_block_ranks
from converter.block_reconstruction import block_ranks
from converter.preconditioners import LayerPreconditioners
from converter.torch_model import load_nq
from nqfmt import ModelConfig, open_nq
from nqfmt import keys as K
from nqfmt.bits import linear_bits
from test_pipeline import run, tiny_preset  # noqa: F401

SMOLLM2_SHAPES = dict(arch="llama", n_layers=4, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536,
                      vocab=300, context_length=64, norm_eps=1e-5, rope_theta=1e5, tie_embeddings=True)


def test_error_tail_is_the_svd_tail_at_the_effective_rank():
    """At total binary rank R the estimate is c times the error of the best continuous approximation whose rank is
    effective_rank(R) (Eckart–Young), interpolated between integer ranks; it falls with R and keeps falling past
    min(m, n), where residual paths still add."""
    gen = torch.Generator().manual_seed(1)
    w, d_in, d_out = torch.randn(70, 45, generator=gen), torch.rand(45, generator=gen) + 0.5, torch.rand(70, generator=gen)
    tail = error_tail(w, d_in, d_out, 3.0, 8, 4 * 45)
    wt = d_out.double()[:, None] * w.double() * d_in.double()[None, :]
    u, s, vh = torch.linalg.svd(wt, full_matrices=False)

    def best_error(r: int) -> float:
        return float((wt - (u[:, :r] * s[:r]) @ vh[:r]).pow(2).sum())
    for step, total in enumerate(range(0, 4 * 45 + 1, 8)):
        k = float(effective_rank(torch.tensor(total), 70, 45))
        lo = int(k)
        want = 3.0 * (best_error(lo) * (1 - (k - lo)) + best_error(min(lo + 1, 45)) * (k - lo))
        assert float(tail[step]) == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert all(tail[i] > tail[i + 1] for i in range(len(tail) - 1))
    assert float(effective_rank(torch.tensor(64), 576, 576)) == pytest.approx(31.1, abs=0.1)


def synthetic(config, loud_layer: int, seed: int = 0):
    """Random weights, and preconditioners whose Fisher scale is 100× larger in one block."""
    gen = torch.Generator().manual_seed(seed)
    weights = [{f"{lin}.weight": torch.randn(*config.linear_shape(lin), generator=gen) * 0.05 for lin in K.LINEARS}
               for _ in range(config.n_layers)]
    pres = []
    for layer in range(config.n_layers):
        p = LayerPreconditioners.uniform(config, config.hidden)
        p.fisher_scale = {lin: 100.0 if layer == loud_layer else 1.0 for lin in K.LINEARS}
        pres.append(p)
    return weights, pres


@pytest.mark.parametrize("bits", [0.55, 1.0, 2.0])
def test_fisher_ranks_spend_the_budget_and_favour_the_sensitive_block(bits):
    config = ModelConfig(**SMOLLM2_SHAPES)
    weights, pres = synthetic(config, loud_layer=2)
    ranks = fisher_ranks(config, weights.__getitem__, pres, bits)
    total = sum(m * n for m, n in map(config.linear_shape, K.LINEARS)) * config.n_layers
    spent = sum(linear_bits(*config.linear_shape(lin), r) for block in ranks for lin, r in block.items())
    assert spent <= bits * total and spent >= 0.995 * bits * total  # within 0.5% of the target, never above
    per_block = [sum(sum(r) for r in block.values()) for block in ranks]
    assert per_block[2] == max(per_block) and per_block[2] > per_block[0]
    for block in ranks:
        for lin, r in block.items():
            assert all(1 <= x <= min(config.linear_shape(lin)) for x in r)


@pytest.mark.parametrize("bits", [0.55, 1.0, 2.0])
def test_last_block_ranks_keep_the_uniform_ones_and_fill_the_budget_in_the_last_block(bits):
    config = ModelConfig(**SMOLLM2_SHAPES)
    weights, pres = synthetic(config, loud_layer=0)  # the Fisher scales do not decide which block grows
    ranks = last_block_ranks(config, weights.__getitem__, pres, bits)
    uniform = block_ranks(config, bits)
    assert ranks[:-1] == [uniform] * (config.n_layers - 1)
    assert all(sum(ranks[-1][lin]) >= sum(uniform[lin]) for lin in K.LINEARS)
    assert any(sum(ranks[-1][lin]) > sum(uniform[lin]) for lin in K.LINEARS)
    total = sum(m * n for m, n in map(config.linear_shape, K.LINEARS)) * config.n_layers
    spent = sum(linear_bits(*config.linear_shape(lin), r) for block in ranks for lin, r in block.items())
    assert 0.995 * bits * total <= spent <= bits * total
    assert spent > sum(linear_bits(*config.linear_shape(lin), r) for lin, r in uniform.items()) * config.n_layers


@pytest.mark.parametrize("allocation", ["fisher", "last-block"])
def test_conversion_with_allocation(tmp_path, tiny_preset, allocation):  # noqa: F811
    """The file holds the allocated ranks (not all blocks alike), equals the converter's model and load_nq, and its
    bits never exceed the target."""
    hf_tiny.save("llama", tmp_path / "src", num_hidden_layers=3)
    summary = run(tmp_path, tmp_path / "src", bits=1.5, allocation=allocation)
    nq = open_nq(summary.out)
    assert f'"allocation":"{allocation}"' in nq.provenance.recipe
    ranks = [[tuple(p.rank for p in nq.linear(layer, name).paths) for name in K.LINEARS] for layer in range(3)]
    assert ranks[0] != ranks[2] or ranks[1] != ranks[2]
    loaded = load_nq(summary.out)
    for ours, back in zip(summary.model.blocks, loaded.blocks):
        for name in K.LINEARS:
            assert torch.equal(back.linears[name].dense_weight(), ours.linears[name].dense_weight())
    assert summary.bpw_linears <= 1.5
    assert P.Options(model="m", out=tmp_path / "o.nq", allocation=allocation).recipe().allocation == allocation
    with pytest.raises(P.ConversionError, match="allocation"):
        P.Options(model="m", out=tmp_path / "o.nq", allocation="magic").recipe()
