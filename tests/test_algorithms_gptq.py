import numpy as np
import pytest
import torch

from mgvq_compile.algorithms.gptq import (
    block_metrics_of,
    feedback_factor,
    block_ldlq,
    block_ldlq_two_sided,
    gptq_quantize,
    ldlq_block_metrics,
    hessian_norm,
    newton_shifted_target,
    newton_step,
    output_matching_target,
    trust_region_target,
)
from mgvq_compile.algorithms.hessian import cholesky_inverse_upper, damp, dead_inputs
from mgvq_compile.algorithms.kmeans import assign_nearest
from mgvq_compile.algorithms.ldl import block_ldl
from mgvq_compile.algorithms.rtn import rtn_quantize, uniform_levels
from mgvq_compile.algorithms.statistics import proxy_loss
from mgvq_compile.errors import CalibrationError
from mgvq_compile.vqgemm import VQGroup, VQWeight

F64 = torch.float64


def random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=F64)
    return a @ a.T / (2 * n) + 1e-3 * torch.eye(n, dtype=F64)


def correlated_layer(m: int, n: int, seed: int, tokens: int = 512):
    """Weights and an input Hessian of strongly correlated inputs with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=F64) / n**0.5 + torch.eye(n, dtype=F64)
    latent = torch.randn(tokens, n // 4, generator=g, dtype=F64)
    noise = 0.1 * torch.randn(tokens, n, generator=g, dtype=F64)
    x = latent @ torch.randn(n // 4, n, generator=g, dtype=F64) + noise
    x = (x @ mix) * torch.exp(torch.randn(n, generator=g, dtype=F64))
    w = torch.randn(m, n, generator=g, dtype=F64)
    return w, x.T @ x / tokens, x


def rtn_dequant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    codes, scales = rtn_quantize(w.numpy(), bits, group_size)
    levels = uniform_levels(bits).astype(np.float64)[:, 0]
    return torch.from_numpy(levels[codes] * np.repeat(scales.astype(np.float64), group_size, axis=1))


def scalar_grid_assign(scales: torch.Tensor, bits: int, group_size: int):
    """d = 1 assign onto GPTQ's per-(row, group) grid, rounding exactly as gptq_quantize does."""
    half = ((1 << bits) - 1) / 2.0

    def assign(target: torch.Tensor, col: int) -> torch.Tensor:
        s = scales[:, col // group_size].to(F64)
        code = torch.clamp(torch.round(target[:, 0] / s + half), 0, (1 << bits) - 1)
        return ((code - half) * s)[:, None]

    return assign


# ---------------------------------------------------------------- hessian / ldl


@pytest.mark.parametrize("block", [1, 2, 4, 8, 16])
def test_block_ldl_reconstructs_spd_with_identity_diagonal_blocks(block):
    for seed in range(3):
        h = random_spd(48, seed)
        lower, d = block_ldl(h, block)
        assert torch.linalg.norm(lower @ d @ lower.T - h) / torch.linalg.norm(h) < 1e-10
        nb = 48 // block
        for i in range(nb):
            sl = slice(i * block, (i + 1) * block)
            assert torch.equal(lower[sl, sl], torch.eye(block, dtype=F64))
            # D is block diagonal, L is block lower triangular
            assert torch.count_nonzero(d[sl, (i + 1) * block :]) == 0
            assert torch.count_nonzero(lower[sl, (i + 1) * block :]) == 0
        if block == 1:
            assert torch.count_nonzero(d - torch.diag(torch.diagonal(d))) == 0
            assert bool((torch.diagonal(d) > 0).all())


def test_block_ldl_rejects_indivisible_size():
    with pytest.raises(ValueError):
        block_ldl(random_spd(10, 0), 4)


def test_damp_raises_until_cholesky_succeeds_on_singular_psd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=g, dtype=F64)
    h = x.T @ x  # rank 4 of 32: singular
    assert int(torch.linalg.cholesky_ex(h)[1]) != 0
    damped, used = damp(h, rel=0.0)
    assert used > 0
    assert int(torch.linalg.cholesky_ex(damped)[1]) == 0
    assert torch.allclose(damped - h, used * torch.eye(32, dtype=F64))
    # default relative damping is 1% of the mean diagonal
    damped, used = damp(h)
    assert used == pytest.approx(0.01 * float(torch.diagonal(h).mean()))
    # an indefinite matrix is raised x10 per try until it factors
    h_neg = h - 0.5 * float(torch.diagonal(h).mean()) * torch.eye(32, dtype=F64)
    h_neg.fill_diagonal_(1.0)
    damped, used = damp(h_neg, rel=0.01)
    base = 0.01
    assert used > base and np.isclose(np.log10(used / base), round(np.log10(used / base)))
    assert int(torch.linalg.cholesky_ex(damped)[1]) == 0


def test_damp_handles_dead_inputs_and_gives_up_when_bounded():
    h = random_spd(8, 1)
    h[2, :] = 0
    h[:, 2] = 0
    assert dead_inputs(h).tolist() == [i == 2 for i in range(8)]
    damped, used = damp(h)
    assert damped[2, 2] == pytest.approx(1.0 + used)
    assert int(torch.linalg.cholesky_ex(damped)[1]) == 0
    with pytest.raises(CalibrationError):
        damp(-torch.eye(4, dtype=F64) * 100, rel=0.01, max_tries=2)
    with pytest.raises(CalibrationError):
        damp(torch.full((3, 3), float("nan")))


def test_cholesky_inverse_upper_factors_the_inverse():
    h = random_spd(24, 2)
    u = cholesky_inverse_upper(h)
    assert torch.equal(u, torch.triu(u))
    assert torch.allclose(u.T @ u, torch.linalg.inv(h), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- gptq


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, act_order):
    for seed in range(3):
        w, h, _ = correlated_layer(24, 128, seed)
        gs = 128 if group_size is None else group_size
        result = gptq_quantize(w, h, bits=bits, group_size=group_size, act_order=act_order)
        loss_gptq = proxy_loss(w, result.q, h)
        loss_rtn = proxy_loss(w, rtn_dequant(w, bits, gs), h)
        assert loss_gptq < 0.8 * loss_rtn, (seed, loss_gptq, loss_rtn)
        # a generic random SPD Hessian: a smaller but real gain
        h_spd = random_spd(128, seed)
        result = gptq_quantize(w, h_spd, bits=bits, group_size=group_size, act_order=act_order)
        assert proxy_loss(w, result.q, h_spd) < proxy_loss(w, rtn_dequant(w, bits, gs), h_spd)


@pytest.mark.parametrize(("group_size", "block_sizes"), [(32, (8, 128)), (48, (16, 128)), (64, (48, 128))])
def test_gptq_lazy_batch_size_does_not_change_the_result(group_size, block_sizes):
    w, h, _ = correlated_layer(16, 192, 4)
    a, b = (gptq_quantize(w, h, bits=3, group_size=group_size, block_size=bs) for bs in block_sizes)
    # same algorithm up to float64 summation order: at most a rare rounding tie flips
    assert float((a.codes != b.codes).double().mean()) < 0.005
    assert torch.allclose(a.scales.double(), b.scales.double(), rtol=1e-2)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_codes_and_scales_decode_exactly_in_vqgemm_layout(act_order):
    bits, gs = 3, 32
    w, h, _ = correlated_layer(16, 96, 5)
    r = gptq_quantize(w.float(), h, bits=bits, group_size=gs, act_order=act_order)
    assert r.codes.dtype == torch.int64 and r.scales.dtype == torch.float16
    assert r.codes.shape == (16, 96) and r.scales.shape == (16, 3)
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) < (1 << bits)
    levels = torch.from_numpy(uniform_levels(bits)).to(F64)[:, 0]
    permuted = levels[r.codes] * r.scales.to(F64).repeat_interleave(gs, dim=1)
    decoded = torch.empty_like(permuted)
    if act_order:
        assert sorted(r.perm.tolist()) == list(range(96))
        decoded[:, r.perm] = permuted
    else:
        assert r.perm is None
        decoded = permuted
    assert torch.equal(decoded, r.q)
    vq = VQWeight(
        out_features=16, in_features=96, vector_dim=1,
        groups=(VQGroup(0, 96, bits, uniform_levels(bits), r.codes.numpy()),),
        perm=None if r.perm is None else r.perm.numpy().astype(np.int32),
        scales=r.scales.numpy(), scale_group_size=gs,
    )
    assert np.array_equal(vq.dequantize(), r.q.numpy().astype(np.float32))
    assert np.array_equal(vq.dequantize().astype(np.float64), r.q.numpy())


def test_gptq_is_deterministic_and_zeroes_dead_inputs():
    w, h, _ = correlated_layer(8, 64, 7)
    h[5, :] = 0
    h[:, 5] = 0
    a = gptq_quantize(w, h, bits=2, group_size=32)
    b = gptq_quantize(w, h, bits=2, group_size=32)
    assert torch.equal(a.q, b.q) and torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert torch.all(a.q[:, 5].abs() == a.scales[:, 0].to(F64) * 0.5)  # 0 rounds to the +-0.5 level


def test_gptq_with_custom_column_quantizer_matches_scalar_grid():
    bits, gs = 2, 32
    w, h, _ = correlated_layer(12, 64, 3)
    ref = gptq_quantize(w, h, bits=bits, group_size=gs)
    assign = scalar_grid_assign(ref.scales, bits, gs)
    custom = gptq_quantize(w, h, quantize_column_fn=lambda col, c: assign(col[:, None], c)[:, 0])
    assert custom.codes is None and torch.equal(custom.q, ref.q)


# ---------------------------------------------------------------- block ldlq


@pytest.mark.parametrize("group_size", [32, None])
def test_block_ldlq_d1_equals_gptq_exactly(group_size):
    bits = 2
    for seed in range(3):
        w, h, _ = correlated_layer(16, 128, seed)
        ref = gptq_quantize(w, h, bits=bits, group_size=group_size)
        gs = ref.group_size
        q = block_ldlq(w, h, scalar_grid_assign(ref.scales, bits, gs), d=1)
        assert torch.equal(q, ref.q)
        # lam = 0, H_O = I: the Newton target is W itself
        target = newton_shifted_target(w, torch.randn(16, 128, dtype=F64), h, lam=0.0)
        assert torch.equal(block_ldlq(target, h, scalar_grid_assign(ref.scales, bits, gs), d=1), ref.q)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_block_ldlq_loss_is_sum_of_block_residuals_and_beats_nearest(d):
    w, h, _ = correlated_layer(16, 64, 11)
    codebook = torch.randn(64, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    residuals = []

    def assign(targets: torch.Tensor, k: int) -> torch.Tensor:
        q = codebook[assign_nearest(targets, codebook)]
        residuals.append((k, targets - q))
        return q

    q = block_ldlq(w, h, assign, d=d)
    assert [k for k, _ in residuals] == list(range(64 // d))
    h_damped, _ = damp(h)
    metrics = ldlq_block_metrics(h, d)
    per_block = sum(float(torch.einsum("ri,ij,rj->", r, metrics[k], r)) for k, r in residuals)
    e = w - q
    total = float(((e @ h_damped) * e).sum())
    assert per_block == pytest.approx(total, rel=1e-8)
    nearest = codebook[assign_nearest(w.reshape(-1, d), codebook)].reshape(16, 64)
    assert proxy_loss(w, q, h) < proxy_loss(w, nearest, h)
    # A factor computed once (as Compensate does for its repeated roundings) gives the same rounding.
    feedback, d_blocks = feedback_factor(h_damped, d)
    assert torch.equal(block_metrics_of(d_blocks, d), metrics)
    assert torch.equal(block_ldlq(w, h, lambda t, _k: codebook[assign_nearest(t, codebook)], d=d, feedback=feedback), q)


def test_block_ldlq_two_sided_reduces_to_one_sided_and_uses_output_hessian():
    m, n, d = 12, 32, 2
    codebook = torch.randn(16, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    residuals = []

    def assign_codebook(targets: torch.Tensor, k: int) -> torch.Tensor:
        return codebook[assign_nearest(targets, codebook)]

    def assign_lattice(targets: torch.Tensor, k: int) -> torch.Tensor:
        q = torch.round(targets / 0.5) * 0.5  # unbounded grid: feedback never clips
        residuals.append((k, targets - q))
        return q

    for seed in range(3):
        w, h_in, _ = correlated_layer(m, n, 30 + seed)
        one = block_ldlq(w, h_in, assign_codebook, d=d)
        eye = torch.eye(m, dtype=F64)
        assert torch.equal(block_ldlq_two_sided(w, h_in, eye, assign_codebook, d=d), one)

        _, h_out, _ = correlated_layer(n, m, 40 + seed)  # correlated outputs, [m, m]
        residuals.clear()
        two = block_ldlq_two_sided(w, h_in, h_out, assign_lattice, d=d)
        one = block_ldlq(w, h_in, assign_lattice, d=d)
        h_in_d, h_out_d = damp(h_in)[0], damp(h_out)[0]

        def kron_proxy(q: torch.Tensor) -> float:
            e = w - q
            return float((h_out_d @ e @ h_in_d * e).sum())

        # the Kronecker proxy is the sum of each (block, row) residual in the metric D_I^-1 / D_O
        metric_in = ldlq_block_metrics(h_in, d)
        metric_out = ldlq_block_metrics(h_out, 1)[:, 0, 0]
        total = sum(
            float(r @ metric_in[k] @ r.T) * float(metric_out[i % m])
            for i, (k, r) in enumerate(residuals[: m * n // d])
        )
        assert total == pytest.approx(kron_proxy(two), rel=1e-8)
        assert kron_proxy(two) < 0.8 * kron_proxy(one)


# ---------------------------------------------------------------- newton target


def test_newton_target_descends_and_reduces_first_plus_second_order_proxy():
    m, n, bits = 16, 64, 2
    for seed in range(4):
        w, h_in, _ = correlated_layer(m, n, 20 + seed)
        gen = torch.Generator().manual_seed(100 + seed)
        # a known gradient of the size of the quantization noise it competes with
        g = torch.randn(m, n, generator=gen, dtype=F64) @ h_in * 0.2
        h_out = random_spd(m, 200 + seed)
        for h_o in (None, h_out, torch.diagonal(h_out)):
            target = newton_shifted_target(w, g, h_in, h_o, lam=0.5)
            assert float((g * (target - w)).sum()) < 0

        codes, scales = rtn_quantize(w.numpy(), bits, n)
        scales_t = torch.from_numpy(scales.astype(np.float32)).to(torch.float16)
        assign = scalar_grid_assign(scales_t, bits, n)

        def proxy(q: torch.Tensor) -> float:
            delta = q - w
            return float((g * delta).sum() + 0.5 * ((delta @ h_in) * delta).sum())

        losses = []
        for lam in (0.0, 0.5, 1.0):
            target = newton_shifted_target(w, g, h_in, lam=lam)
            losses.append(proxy(block_ldlq(target, h_in, assign, d=1)))
        assert losses[1] < losses[0] and losses[2] < losses[0], (seed, losses)


def test_trust_region_target_moves_by_the_radius_along_the_newton_direction():
    w, h_in, _ = correlated_layer(16, 64, 30)
    g = torch.randn(16, 64, generator=torch.Generator().manual_seed(3), dtype=F64) @ h_in
    h_out = random_spd(16, 31)
    step = newton_step(g, h_in, h_out)
    assert torch.allclose(w - step, newton_shifted_target(w, g, h_in, h_out, lam=1.0))
    for radius in (0.01, 0.1):
        target = trust_region_target(w, step, h_in, radius=radius)
        assert hessian_norm(target - w, h_in) == pytest.approx(radius * hessian_norm(w, h_in), rel=1e-9)
        assert float((g * (target - w)).sum()) < 0  # still a descent direction
    assert torch.equal(trust_region_target(w, step, h_in, radius=0.0), w)


def test_output_matching_target_is_the_least_squares_map_from_actual_to_reference_inputs():
    gen = torch.Generator().manual_seed(5)
    x_ref = torch.randn(400, 24, generator=gen, dtype=F64)
    mixing = torch.eye(24, dtype=F64) + 0.1 * torch.randn(24, 24, generator=gen, dtype=F64)
    x = x_ref @ mixing + 0.01 * torch.randn(400, 24, generator=gen, dtype=F64)  # inputs after upstream error
    w = torch.randn(8, 24, generator=gen, dtype=F64)
    h, cross = x.T @ x, x_ref.T @ x
    target = output_matching_target(w, cross, h, damp_rel=1e-9)
    least_squares = torch.linalg.lstsq(x, x_ref @ w.T).solution.T  # argmin_Q |X_ref W^T - X Q^T|
    assert torch.allclose(target, least_squares, rtol=1e-5, atol=1e-6)
    residual = lambda q: float(((x_ref @ w.T - x @ q.T) ** 2).sum())  # noqa: E731
    assert residual(target) < 0.01 * residual(w)
    # Inputs that agree give W back exactly, whatever the damping.
    assert torch.equal(output_matching_target(w, h, h, damp_rel=0.1), w)
    # A strength a moves that fraction of the way: a = 0 is W, and the shift is linear in a.
    assert torch.equal(output_matching_target(w, cross, h, damp_rel=1e-9, strength=0.0), w)
    quarter = output_matching_target(w, cross, h, damp_rel=1e-9, strength=0.25)
    assert torch.allclose(quarter - w, 0.25 * (target - w), rtol=1e-9, atol=1e-12)
    assert residual(target) < residual(quarter) < residual(w)


def test_assign_in_metric_is_the_brute_force_argmin():
    from mgvq_compile.algorithms.kmeans import assign_in_metric

    gen = torch.Generator().manual_seed(5)
    vectors, centroids = torch.randn(300, 4, generator=gen), torch.randn(32, 4, generator=gen)
    a = torch.randn(4, 4, generator=gen, dtype=F64)
    metric = a @ a.T + 0.1 * torch.eye(4, dtype=F64)
    diff = (vectors[:, None, :] - centroids[None, :, :]).to(F64)
    brute = torch.einsum("vki,ij,vkj->vk", diff, metric, diff).argmin(dim=1)
    assert torch.equal(assign_in_metric(vectors, centroids, metric), brute)
    assert not torch.equal(brute, assign_nearest(vectors, centroids))  # the metric matters here
