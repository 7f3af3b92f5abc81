"""Residual binary paths: the rule that splits a bits target into paths and ranks, the ADMM initialisation of each
later path on what the earlier ones leave, and a whole conversion above one path's maximum."""
import pytest
import torch

import hf_tiny
from converter import block_reconstruction as B
from converter import pipeline as P
from converter.admm import AdmmSettings
from converter.preconditioners import LayerPreconditioners
from converter.torch_model import DecoderBlock, load_nq
from nqfmt import keys as K
from nqfmt import open_nq
from nqfmt.bits import linear_bits, max_single_path_bits, rank_for_bits, ranks_for_bits
from test_pipeline import TINY, run  # noqa: F401  (TINY via the tiny_preset fixture)
from test_pipeline import tiny_preset  # noqa: F401


@pytest.mark.parametrize("m,n", [(576, 576), (192, 576), (1536, 576), (576, 1536), (100, 72), (24, 72)])
@pytest.mark.parametrize("bits", [0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_ranks_rule(m, n, bits):
    ranks = ranks_for_bits(m, n, bits)
    top = min(m, n)
    if bits <= max_single_path_bits(m, n):
        assert ranks == (rank_for_bits(m, n, bits),)  # one path, exactly the single-path rule
        return
    p = len(ranks)
    assert p >= 2 and all(1 <= r <= top for r in ranks) and list(ranks) == sorted(ranks, reverse=True)
    assert max(ranks) - min(ranks) <= min(32, top)  # as equal as the rank unit allows
    total = max(min(32, top) * p, int((bits * m * n / (m + n) - 16 * p) // min(32, top)) * min(32, top))
    assert total <= p * top
    if top >= 32:
        assert sum(ranks) == total and all(r % 32 == 0 for r in ranks)
        assert linear_bits(m, n, ranks) <= bits * m * n  # never above the target
        if p > 2:  # (two paths start where one path's maximum ends)
            fewer = int((bits * m * n / (m + n) - 16 * (p - 1)) // 32) * 32
            assert fewer > (p - 1) * top  # p − 1 paths could not hold the rank


def test_later_paths_factorize_what_the_earlier_leave():
    """Each path added by factorize lowers the weight's error, and the first path is the one-path factorization."""
    torch.manual_seed(0)
    config = hf_tiny.build("llama").config
    from converter.sources import config_from_hf
    cfg = config_from_hf(config.to_dict())
    weights = {f"{name}.weight": torch.randn(*cfg.linear_shape(name)) * 0.1 for name in K.LINEARS}
    weights.update({f"{nm}.weight": torch.ones(cfg.hidden) for nm in cfg.block_norms()})
    pre = LayerPreconditioners.uniform(cfg, cfg.hidden)
    one, three = DecoderBlock(cfg, 0, weights), DecoderBlock(cfg, 0, weights)
    settings = AdmmSettings(iterations=20)
    rank = {name: min(16, *cfg.linear_shape(name)) for name in K.LINEARS}
    B.factorize(one, {name: (rank[name],) for name in K.LINEARS}, pre, settings, seed=3)
    B.factorize(three, {name: (rank[name],) * 3 for name in K.LINEARS}, pre, settings, seed=3)
    for name in K.LINEARS:
        w = weights[f"{name}.weight"]
        lin1, lin3 = one.linears[name], three.linears[name]
        assert lin3.ranks == (rank[name],) * 3
        assert torch.equal(lin3.paths[0].dense_weight(), lin1.paths[0].dense_weight())
        errors = [float((w - sum(p.dense_weight() for p in lin3.paths[:k])).norm()) for k in (1, 2, 3)]
        assert errors[0] > errors[1] > errors[2]


def test_conversion_above_one_paths_maximum(tmp_path, tiny_preset):  # noqa: F811
    """At 3 bits every linear carries the rule's paths; the file, the converter's model and load_nq agree exactly;
    the achieved bits count every path."""
    hf_tiny.save("qwen2", tmp_path / "src")
    summary = run(tmp_path, tmp_path / "src", bits=3.0)
    nq = open_nq(summary.out)
    nq.verify()
    c = nq.config
    loaded = load_nq(summary.out)
    for layer, (ours, back) in enumerate(zip(summary.model.blocks, loaded.blocks)):
        for name in K.LINEARS:
            want = ranks_for_bits(*c.linear_shape(name), 3.0)
            assert nq.linears[layer][name].ranks == want
            assert ours.linears[name].ranks == want
            assert torch.equal(back.linears[name].dense_weight(), ours.linears[name].dense_weight())
    assert any(len(ranks_for_bits(*c.linear_shape(name), 3.0)) > 1 for name in K.LINEARS)
    shapes = [c.linear_shape(n) for n in K.LINEARS]
    want = sum(linear_bits(m, n, ranks_for_bits(m, n, 3.0)) for m, n in shapes) / sum(m * n for m, n in shapes)
    assert summary.bpw_linears == pytest.approx(want, rel=1e-12)
    tokens = torch.randint(0, hf_tiny.VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), summary.model(tokens))


@pytest.mark.parametrize("bits", [0.4, 4.01])
def test_bits_outside_the_range_are_refused(bits):
    with pytest.raises(P.ConversionError, match="0.5..4"):
        P.check_bits(bits)
