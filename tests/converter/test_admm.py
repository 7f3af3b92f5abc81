"""LB-ADMM and the rank rule, against slow float64 references on odd shapes."""
import numpy as np
import pytest
import torch

from converter.admm import AdmmSettings, balance, fit_scales, lb_admm, sign, svid, weighted_error
from nqfmt.bits import path_bits, rank_for_bits


def low_rank_plus_noise(m: int, n: int, k: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) / k ** 0.5 + noise * torch.randn(
        m, n, generator=g)


def test_deployed_error_falls_with_iterations():
    w = low_rank_plus_noise(131, 77, 9, 0.2, seed=3)
    g = torch.Generator().manual_seed(4)
    d_in, d_out = torch.rand(77, generator=g) + 0.5, torch.rand(131, generator=g) + 0.5
    errors = []
    for iterations in (2, 10, 60):
        f = lb_admm(w, 40, d_in, d_out, AdmmSettings(iterations=iterations), seed=0)
        errors.append(weighted_error(w, f.deployed(), d_in, d_out))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[0]


def test_deployed_matrix_matches_float64_reference():
    w = low_rank_plus_noise(45, 67, 5, 0.1, seed=5)
    f = lb_admm(w, 33, settings=AdmmSettings(iterations=15))
    u = np.where(f.u_latent.numpy() >= 0, 1.0, -1.0)
    v = np.where(f.v_latent.numpy() >= 0, 1.0, -1.0)
    ref = f.scale_out.double().numpy()[:, None] * (u @ v) * f.scale_in.double().numpy()[None, :]
    np.testing.assert_allclose(f.deployed().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert f.u_latent.shape == (45, 33) and f.v_latent.shape == (33, 67)
    assert abs(float(f.u_latent.abs().mean()) - 1) < 1e-5 and abs(float(f.v_latent.abs().mean()) - 1) < 1e-5


def test_balancing_leaves_product_unchanged():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(37, generator=g) * 50, torch.randn(53, generator=g) * 0.01
    a2, b2 = balance(a, b)
    torch.testing.assert_close(torch.outer(a2, b2).double(), torch.outer(a, b).double(), rtol=1e-5, atol=1e-9)
    assert abs(float(a2.pow(2).mean().sqrt() / b2.pow(2).mean().sqrt()) - 1) < 1e-5


def test_scale_fit_is_weighted_least_squares_optimum():
    g = torch.Generator().manual_seed(8)
    m, n, r = 29, 41, 7
    w = torch.randn(m, n, generator=g)
    p = sign(torch.randn(m, r, generator=g)) @ sign(torch.randn(r, n, generator=g))
    d_in, d_out = torch.rand(n, generator=g) + 0.3, torch.rand(m, generator=g) + 0.3
    so, si = fit_scales(w, p, torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1, d_out, d_in, 200)
    before = weighted_error(w, so[:, None] * p * si[None, :], d_in, d_out)
    # one row's scale is the float64 closed form given the others: perturbing it cannot help
    wt = (d_out[:, None] * d_in[None, :]).double() ** 2
    num = (wt[0] * w[0].double() * p[0].double() * si.double()).sum()
    den = (wt[0] * (p[0].double() * si.double()) ** 2).sum()
    assert abs(float(num / den) - float(so[0])) < 1e-3 * abs(float(so[0])) + 1e-6
    for delta in (1.01, 0.99):
        so2 = so.clone()
        so2[3] *= delta
        assert weighted_error(w, so2[:, None] * p * si[None, :], d_in, d_out) >= before - 1e-7


def test_svid_is_sign_times_rank_one():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(23, 19, generator=g)
    proj, a, b = svid(x, 30)
    assert torch.equal(sign(proj), sign(x))
    ref = np.linalg.svd(np.abs(x.double().numpy()))
    best = ref[1][0] * np.outer(np.abs(ref[0][:, 0]), np.abs(ref[2][0]))
    np.testing.assert_allclose(torch.outer(a, b).numpy(), best, rtol=1e-3, atol=1e-4)


def test_rank_rule_exact():
    for m, n, b in ((576, 576, 1.0), (192, 576, 1.0), (1536, 576, 1.0), (576, 1536, 0.55), (100, 72, 0.8),
                    (4096, 4096, 1.0), (11008, 4096, 0.55)):
        r = int(np.floor((b * m * n / (m + n) - 16) / 32) * 32)
        assert rank_for_bits(m, n, b) == min(max(r, 32), min(m, n))
    # SmolLM2-135M at 1.0: q/o 256, k/v 128, gate/up/down 384 (spec/FORMAT.md §4), 0.9557 over the decoder linears
    shapes = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]
    ranks = [rank_for_bits(m, n, 1.0) for m, n in shapes]
    assert ranks == [256, 256, 128, 128, 384, 384, 384]
    bpw = sum(path_bits(m, n, r) for (m, n), r in zip(shapes, ranks)) / sum(m * n for m, n in shapes)
    assert round(bpw, 4) == 0.9557


def test_admm_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        lb_admm(torch.randn(5, 7), 6)


def test_sign_is_plus_one_at_either_zero_and_matches_the_comparison_rule():
    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(11))
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-45, -1e-45])
    got = sign(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.where(x >= 0, 1.0, -1.0))
    assert got[0, :4].tolist() == [1.0, 1.0, 1.0, -1.0]
