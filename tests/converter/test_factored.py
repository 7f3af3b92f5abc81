"""BinaryFactoredLinear against a float64 numpy reference; export layout; STE gradients."""
import numpy as np
import pytest
import torch

from converter.factored import BinaryFactoredLinear
from nqfmt import LinearPlan, unpack_signs
from nqfmt import keys as K

M, N, R = 45, 71, 37  # none a multiple of 32


def random_factors(rng, m=M, n=N, r=R, mid=True):
    return dict(u=rng.standard_normal((m, r)), v=rng.standard_normal((r, n)),
                scale_in=rng.uniform(0.5, 1.5, n), scale_out=rng.uniform(0.01, 0.1, m),
                scale_mid=rng.uniform(0.5, 2.0, r) if mid else None)


def reference(x, paths, bias):
    """y = bias + Σ scale_out ⊙ (sign(U) @ (scale_mid ⊙ (sign(V) @ (scale_in ⊙ x)))) in float64, sign(0) = +1."""
    sign = lambda a: np.where(a >= 0, 1.0, -1.0)  # noqa: E731
    y = np.zeros((x.shape[0], paths[0]["u"].shape[0])) + (0 if bias is None else bias)
    for p in paths:
        t = (x * p["scale_in"]) @ sign(p["v"]).T
        if p["scale_mid"] is not None:
            t = t * p["scale_mid"]
        y += (t @ sign(p["u"]).T) * p["scale_out"]
    return y


def f32(a):
    return None if a is None else np.asarray(a, dtype=np.float32).astype(np.float64)


@pytest.mark.parametrize("mid,bias,n_paths", [(False, False, 1), (True, True, 1), (True, False, 2)])
def test_forward_matches_float64_reference(mid, bias, n_paths):
    rng = np.random.default_rng(1)
    paths = [random_factors(rng, mid=mid) for _ in range(n_paths)]
    paths[0]["u"][0, 0] = 0.0  # sign(0) must be +1
    b = rng.standard_normal(M) if bias else None
    lin = BinaryFactoredLinear.from_factors(**{k: torch.tensor(v) if v is not None else None
                                               for k, v in paths[0].items()}, bias=b)
    for p in paths[1:]:
        lin.add_path(**p)
    x = rng.standard_normal((5, N))
    got = lin(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    want = reference(f32(x), [{k: f32(v) for k, v in p.items()} for p in paths], f32(b))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    dense = lin.dense_weight().numpy()
    np.testing.assert_allclose(f32(x) @ dense.T + (0 if b is None else f32(b)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def test_forward_on_batched_sequences():
    rng = np.random.default_rng(2)
    lin = BinaryFactoredLinear.from_factors(**random_factors(rng))
    x = torch.randn(2, 3, N)
    np.testing.assert_allclose(lin(x).detach().numpy(), lin(x.reshape(6, N)).detach().numpy().reshape(2, 3, M),
                               rtol=1e-6, atol=1e-7)


def test_ste_gradient_reaches_latents_then_freezing_stops_it():
    rng = np.random.default_rng(3)
    lin = BinaryFactoredLinear.from_factors(**random_factors(rng))
    x = torch.randn(4, N)
    lin(x).square().sum().backward()
    p = lin.paths[0]
    for t in (p.latent_u, p.latent_v, p.scale_in, p.scale_out, p.scale_mid):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert len(lin.latents()) == 2
    signs_before = lin.dense_weight()
    lin.freeze_signs()
    assert lin.signs_frozen and lin.latents() == []
    assert not any(name.startswith("latent") for name, _ in p.named_parameters())
    assert set(torch.unique(p.latent_u).tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(lin.dense_weight(), signs_before, rtol=0, atol=0)
    lin(x).sum().backward()
    assert p.scale_in.grad is not None


def test_ste_backward_is_identity():
    u = torch.tensor([[0.3, -2.0]], requires_grad=True)
    lin = BinaryFactoredLinear.from_factors(u.detach(), torch.ones(2, 1), torch.ones(1), torch.ones(1))
    x = torch.tensor([[1.5]])
    lin(x).sum().backward()
    # y = sign(u0) x + sign(u1) x; d y / d latent_u = x per entry under the identity STE
    torch.testing.assert_close(lin.paths[0].latent_u.grad, torch.tensor([[1.5, 1.5]]))


def test_export_layout_and_fp16_rounding():
    rng = np.random.default_rng(4)
    f = random_factors(rng)
    lin = BinaryFactoredLinear.from_factors(**f, bias=rng.standard_normal(M))
    lin.add_path(**random_factors(rng))
    out = lin.export(3, K.ATTN_Q)
    names = [K.path_tensor(3, K.ATTN_Q, p, part) for p in (0, 1)
             for part in (K.V_SIGNS, K.U_SIGNS, K.SCALE_IN, K.SCALE_OUT, K.SCALE_MID)] + [K.bias_tensor(3, K.ATTN_Q)]
    assert list(out) == names
    v = out[K.path_tensor(3, K.ATTN_Q, 0, K.V_SIGNS)]
    assert v.dtype == np.uint32 and v.shape == (R, 3)
    np.testing.assert_array_equal(unpack_signs(v, N), np.where(f["v"] >= 0, 1, -1))
    u = out[K.path_tensor(3, K.ATTN_Q, 0, K.U_SIGNS)]
    assert u.dtype == np.uint32 and u.shape == (M, 2)
    np.testing.assert_array_equal(unpack_signs(u, R), np.where(f["u"] >= 0, 1, -1))
    assert out[K.path_tensor(3, K.ATTN_Q, 0, K.SCALE_IN)].dtype == np.float16
    assert out[K.bias_tensor(3, K.ATTN_Q)].dtype == np.float32
    assert lin.plan() == LinearPlan((R, R), True)
    lin.round_scales_to_fp16()
    s = lin.paths[0].scale_out.detach().numpy()
    np.testing.assert_array_equal(s, s.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("bad", ["shape", "mid", "bias"])
def test_inconsistent_factors_are_refused(bad):
    rng = np.random.default_rng(5)
    f = random_factors(rng)
    with pytest.raises(ValueError):
        if bad == "shape":
            BinaryFactoredLinear.from_factors(**{**f, "scale_in": np.ones(N + 1)})
        elif bad == "mid":
            BinaryFactoredLinear.from_factors(**f).add_path(**random_factors(rng, mid=False))
        else:
            BinaryFactoredLinear.from_factors(**f, bias=np.ones(M - 1))


def test_frozen_construction_equals_freezing_latents():
    from converter.factored import TrainablePath

    rng = np.random.default_rng(6)
    f = random_factors(rng)
    lin = BinaryFactoredLinear.from_factors(**f)
    lin.freeze_signs()
    signs = {k: torch.tensor(np.where(f[k] >= 0, 1.0, -1.0), dtype=torch.float32) for k in ("u", "v")}
    frozen = BinaryFactoredLinear([TrainablePath(signs["u"], signs["v"], f["scale_in"], f["scale_out"], f["scale_mid"],
                                              frozen=True)])
    assert frozen.signs_frozen and frozen.latents() == [] and len(frozen.scales()) == 3
    x = torch.randn(3, N)
    torch.testing.assert_close(frozen(x), lin(x), rtol=0, atol=0)
