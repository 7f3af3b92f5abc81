"""export → nqfmt write → open_nq → load_nq gives back exactly the model that was exported."""
import numpy as np
import pytest
import torch
from nqfmt.keys import GGMLType
from gguf.quants import dequantize, quantize

import hf_tiny
from converter.factored import BinaryFactoredLinear
from converter.torch_model import TorchModel, load_nq
from converter.sources import open_source
from nqfmt import NQWriter, TokenizerInfo
from nqfmt import keys as K
from synthetic import TINY_TOKENIZER, provenance


def binarize(model: TorchModel, ranks=(13, 40), has_mid=True, seed=0) -> None:
    """Swap every linear for a random factored one (odd ranks, two paths) rounded to what the file holds."""
    rng = np.random.default_rng(seed)
    c = model.config
    for block in model.blocks:
        for name, lin in list(block.linears.items()):
            m, n = c.linear_shape(name)
            paths = [dict(u=rng.standard_normal((m, min(r, m, n))), v=rng.standard_normal((min(r, m, n), n)),
                          scale_in=rng.uniform(0.5, 1.5, n), scale_out=rng.uniform(0.01, 0.05, m),
                          scale_mid=rng.uniform(0.5, 1.5, min(r, m, n)) if has_mid else None) for r in ranks]
            bias = None if lin.bias is None else lin.bias
            f = BinaryFactoredLinear.from_factors(**paths[0], bias=bias)
            for p in paths[1:]:
                f.add_path(**p)
            f.freeze_signs()
            f.round_scales_to_fp16()
            block.linears[name] = f


def model_tensors(model: TorchModel, embedding_type: GGMLType) -> dict[str, np.ndarray]:
    """Every tensor of the file for `model`, by name (what a pipeline's writer loop would produce)."""
    def embedding(t: torch.Tensor) -> np.ndarray:
        a = t.detach().numpy()
        return quantize(a, GGMLType.Q8_0) if embedding_type == GGMLType.Q8_0 else a.astype(np.float16)

    out = {K.TOKEN_EMBD: embedding(model.token_embd), K.OUTPUT_NORM: model.output_norm.weight.detach().numpy()}
    if model.output is not None:
        out[K.OUTPUT] = embedding(model.output)
    for layer, block in enumerate(model.blocks):
        for name, norm in block.norms.items():
            out[K.norm_tensor(layer, name)] = norm.weight.detach().numpy()
        for name, lin in block.linears.items():
            out.update(lin.export(layer, name))
    return out


def write(model: TorchModel, path, embedding_type: GGMLType) -> None:
    tensors = model_tensors(model, embedding_type)
    plans = [{name: lin.plan() for name, lin in block.linears.items()} for block in model.blocks]
    tok = TokenizerInfo(TINY_TOKENIZER, None, bos_id=0, eos_id=1)
    with NQWriter(path, model.config, tok, provenance(), plans, embedding_type=embedding_type) as w:
        for spec in w.plan:
            w.write(spec.name, tensors[spec.name])


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_round_trip_is_exact(arch, tmp_path):
    hf_tiny.save(arch, tmp_path)
    model = TorchModel.from_source(open_source(str(tmp_path)))
    binarize(model)
    with torch.no_grad():  # the file holds F16 embeddings: make the torch model hold the same values
        model.token_embd.copy_(model.token_embd.half().float())
        if model.output is not None:
            model.output.copy_(model.output.half().float())
    write(model, tmp_path / "m.nq", GGMLType.F16)
    loaded = load_nq(tmp_path / "m.nq")
    for block, back in zip(model.blocks, loaded.blocks):
        for name in K.LINEARS:
            torch.testing.assert_close(back.linears[name].dense_weight(), block.linears[name].dense_weight(),
                                       rtol=0, atol=0)
            assert back.linears[name].signs_frozen and back.linears[name].plan() == block.linears[name].plan()
    tokens = torch.randint(0, hf_tiny.VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(tokens)
        assert want.abs().max() > 0.1
        torch.testing.assert_close(loaded(tokens), want, rtol=0, atol=0)


def test_q8_embedding_is_dequantized(tmp_path):
    hf_tiny.save("llama", tmp_path, hidden_size=96)  # Q8_0 needs rows of a multiple of 32
    model = TorchModel.from_source(open_source(str(tmp_path)))
    binarize(model, ranks=(33,), has_mid=False)
    write(model, tmp_path / "q8.nq", GGMLType.Q8_0)
    loaded = load_nq(tmp_path / "q8.nq")
    a = model.token_embd.detach().numpy()
    want = dequantize(quantize(a, GGMLType.Q8_0), GGMLType.Q8_0).reshape(a.shape)
    np.testing.assert_array_equal(loaded.token_embd.numpy(), want)
    assert np.abs(want - a).max() < 0.02 * np.abs(a).max()
