"""The torch reference forward against transformers on tiny random checkpoints of every architecture."""
import dataclasses

import numpy as np
import pytest
import torch

import hf_tiny
from converter.factored import BinaryFactoredLinear
from converter.torch_model import DecoderBlock, TorchModel, attention_mask, rope
from converter.sources import config_from_hf, open_source
from nqfmt import keys as K


@pytest.fixture(scope="module", params=list(hf_tiny.ARCHS))
def saved(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = hf_tiny.save(request.param, directory)
    model.config._attn_implementation = "eager"
    return request.param, directory, model


def test_logits_match_transformers(saved):
    arch, directory, hf_model = saved
    source = open_source(str(directory))
    assert source.config.arch == arch
    ours = TorchModel.from_source(source)
    tokens = torch.randint(0, hf_tiny.VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(tokens).logits
        got = ours(tokens)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_block_by_block_equals_whole_model(saved):
    _, directory, _ = saved
    source = open_source(str(directory))
    model = TorchModel.from_source(source)
    tokens = torch.randint(0, hf_tiny.VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = model.embed(tokens)
        for block in model.blocks:
            h = block(h)
        torch.testing.assert_close(model.head(h), model(tokens), rtol=0, atol=0)


def _config(arch):
    """The ModelConfig our source mapping derives from the tiny transformers config."""
    return config_from_hf(hf_tiny.build(arch).config.to_dict())


def test_windows_and_rope_scaling_are_exercised():
    """The tiny configs must actually depend on the features they are meant to test."""
    for arch in ("gemma3", "mistral"):
        cfg = _config(arch)
        layer = cfg.sliding_layers.index(True)
        assert attention_mask(cfg, layer, 11).sum() < torch.ones(11, 11).tril().sum()
    cfg = _config("llama")
    assert cfg.rope_scaling_type == "llama3"
    plain = dataclasses.replace(cfg, rope_scaling_type="none")
    assert not torch.allclose(rope(cfg, 0, torch.arange(5))[0], rope(plain, 0, torch.arange(5))[0])


def test_gemma_local_layers_use_local_theta():
    cfg = _config("gemma3")
    assert cfg.sliding_layers == (True, False) and cfg.rope_theta_local != cfg.rope_theta
    pos = torch.arange(7)
    local, glob = rope(cfg, 0, pos)[0], rope(cfg, 1, pos)[0]
    ref = dataclasses.replace(cfg, rope_theta=cfg.rope_theta_local, sliding_layers=(False, False))
    torch.testing.assert_close(local, rope(ref, 0, pos)[0])
    assert not torch.allclose(local, glob)


def test_softcap_path_matches_plain_attention_for_a_huge_cap(saved):
    """The explicit attention (used with a logit softcap) equals SDPA when the cap cannot bite."""
    _, directory, _ = saved
    source = open_source(str(directory))
    model = TorchModel.from_source(source)
    tokens = torch.randint(0, hf_tiny.VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(tokens)
        model.config = dataclasses.replace(source.config, attn_softcap=1e7)
        for block in model.blocks:
            block.config = model.config
        torch.testing.assert_close(model(tokens), want, rtol=0, atol=1e-4)


def test_linears_are_replaceable(saved):
    """A block whose linears are BinaryFactoredLinears computes what the same block with their dense weights does."""
    _, directory, _ = saved
    source = open_source(str(directory))
    weights = source.block_weights(0)
    rng = np.random.default_rng(8)
    factored = {}
    for name in K.LINEARS:
        m, n = source.config.linear_shape(name)
        r = min(m, n) - 3
        factored[name] = BinaryFactoredLinear.from_factors(
            rng.standard_normal((m, r)), rng.standard_normal((r, n)), rng.uniform(0.5, 1.5, n),
            rng.uniform(0.5, 1.5, m) / np.sqrt(r * n), bias=weights.get(f"{name}.bias"))
    block = DecoderBlock(source.config, 0, weights, factored)
    assert set(block.linears) == set(K.LINEARS) and set(block.norms) == set(source.config.block_norms())
    dense = dict(weights, **{f"{name}.weight": lin.dense_weight() for name, lin in factored.items()})
    x = torch.randn(2, 11, source.config.hidden, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(block(x), DecoderBlock(source.config, 0, dense)(x), rtol=1e-4, atol=1e-4)
