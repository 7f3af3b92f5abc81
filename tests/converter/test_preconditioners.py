"""Block-by-block gradient statistics equal those of one whole-model autograd pass (the slow obvious way)."""
import torch
from torch.nn import functional as F

import hf_tiny
from converter.preconditioners import ClippedSecondMoment, collect_preconditioners, preconditioner, shrink
from converter.torch_model import TorchModel
from converter.sources import open_source
from nqfmt import keys as K


def whole_model_reference(model: TorchModel, tokens: torch.Tensor, batch: int, gamma: float):
    """Hooks on every linear of the full model, one backward of the mean next-token loss per batch."""
    acts = {(i, n): ClippedSecondMoment() for i in range(len(model.blocks)) for n in K.LINEARS}
    grads = {(i, n): ClippedSecondMoment() for i in range(len(model.blocks)) for n in K.LINEARS}
    for i, block in enumerate(model.blocks):
        for name, lin in block.linears.items():
            def hook(mod, args, out, key=(i, name)):
                acts[key].add(args[0])
                out.register_hook(lambda g, key=key: grads[key].add(g))
            lin.register_forward_hook(hook)
    total = tokens.shape[0] * (tokens.shape[1] - 1)
    for s in range(0, tokens.shape[0], batch):
        t = tokens[s:s + batch]
        h = model.embed(t).requires_grad_(True)  # the embedding is frozen: give the graph a leaf
        for block in model.blocks:
            h = block(h)
        logits = model.head(h)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1),
                               reduction="sum") / total
        loss.backward()
    return ({k: preconditioner(v.mean(), gamma) for k, v in acts.items()},
            {k: preconditioner(v.mean(), gamma) for k, v in grads.items()})


def test_block_by_block_matches_whole_model(tmp_path):
    hf_tiny.save("qwen2", tmp_path / "m")
    source = open_source(str(tmp_path / "m"))
    model = TorchModel.from_source(source)
    tokens = torch.randint(0, hf_tiny.VOCAB, (5, 11), generator=torch.Generator().manual_seed(0))
    got = collect_preconditioners(source.config, model, lambda i: model.blocks[i], tokens, 0.3, 2, spill=tmp_path)
    want_in, want_out = whole_model_reference(TorchModel.from_source(source), tokens, 2, 0.3)
    for i, imp in enumerate(got):
        for name in K.LINEARS:
            torch.testing.assert_close(imp.d_in[name], want_in[(i, name)], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(imp.d_out[name], want_out[(i, name)], rtol=1e-4, atol=1e-6)
    assert not list(tmp_path.glob("stat-boundary-*"))


def test_clipping_and_shrinkage():
    x = torch.ones(2000, 3)
    x[7] *= 100.0  # one outlier token among 2000: clipped to the 2nd-largest norm (k = 2)
    x[8] *= 2.0
    m = ClippedSecondMoment()
    m.add(x)
    torch.testing.assert_close(m.mean(), torch.full((3,), (1998 + 2 * 4) / 2000))
    v = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(shrink(v, 0.5), torch.tensor([1.5, 2.5]))
