"""Weighted k-means, centroid refinement, channel sensitivities/groups and bit allocation."""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mgvq_compile.algorithms.allocation import (
    GroupSpec,
    allocate_bits,
    allocate_bits_total,
    group_cost_bits,
    COMPENSATED_STEPS,
    MIN_MEASURED_STEP,
    measured_steps,
    relative_distortion,
    stored_bits,
    summarize_allocation,
)
from mgvq_compile.algorithms.kmeans import kmeans
from mgvq_compile.algorithms.sensitivity import (
    channel_groups,
    global_sensitivity,
    group_sensitivities,
    local_sensitivity,
)
from mgvq_compile.algorithms.statistics import accumulate, kronecker_scale, new_statistics
from mgvq_compile.algorithms.gptq import block_ldlq, ldlq_block_metrics
from mgvq_compile.algorithms.kmeans import assign_in_metric, assign_nearest
from mgvq_compile.algorithms.weighted_kmeans import (
    alternate_codes_and_codebooks,
    hessian_loss,
    layer_hessian_loss,
    refine_centroids,
    refine_group_codebooks,
    weighted_assign,
    weighted_distortion,
    weighted_kmeans,
)
from mgvq_compile.errors import InputError, RecipeError


def _data(n: int = 3000, d: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


# ----------------------------------------------------------------------------- weighted k-means


def test_weighted_kmeans_beats_plain_kmeans_on_skewed_weights() -> None:
    v = _data()
    g = torch.Generator().manual_seed(1)
    # Heavy-tailed per-vector weights times a per-coordinate skew, like diag(H_O)_r * diag(H_I)_c.
    weights = torch.exp(2.0 * torch.randn(v.shape[0], 1, generator=g)) * torch.tensor([[50.0, 5.0, 1.0, 0.2]])
    weighted = weighted_kmeans(v, weights, 16, iterations=30, seed=0)
    plain = kmeans(v, 16, iterations=30, seed=0)
    loss_weighted = weighted_distortion(v, weights, weighted)
    loss_plain = weighted_distortion(v, weights, plain)
    assert loss_weighted < 0.8 * loss_plain


def test_weighted_kmeans_with_uniform_weights_matches_plain_quality() -> None:
    v = _data(seed=2)
    ones = torch.ones(v.shape[0])
    weighted = weighted_kmeans(v, ones, 32, iterations=30, seed=0)
    plain = kmeans(v, 32, iterations=30, seed=0)
    loss_weighted = weighted_distortion(v, ones, weighted)
    loss_plain = weighted_distortion(v, ones, plain)
    assert loss_weighted < 1.05 * loss_plain


def test_weighted_kmeans_is_deterministic_and_subsamples() -> None:
    v = _data(n=5000)
    w = torch.rand(5000, 4, generator=torch.Generator().manual_seed(3))
    a = weighted_kmeans(v, w, 16, iterations=5, seed=7, init_sample=500, fit_sample=1000)
    b = weighted_kmeans(v, w, 16, iterations=5, seed=7, init_sample=500, fit_sample=1000)
    assert a.shape == (16, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # more centroids than vectors: every vector is a codeword
    few = weighted_kmeans(v[:5], w[:5], 8, seed=0)
    assert few.shape == (8, 4) and torch.equal(few[:5], v[:5])


def test_weighted_assign_uses_the_weighted_metric() -> None:
    centroids = torch.tensor([[0.0, 0.0], [1.0, 10.0]])
    v = torch.tensor([[0.9, 4.0]])
    # Euclidean: 0.81 + 16 to codeword 0 against 0.01 + 36 to codeword 1.
    assert int(weighted_assign(v, torch.ones(1, 2), centroids)[0]) == 0
    # Weight only the first coordinate: codeword 1 (x = 1) is nearer.
    assert int(weighted_assign(v, torch.tensor([[1.0, 0.0]]), centroids)[0]) == 1
    assert int(weighted_assign(v, torch.tensor([[100.0, 1.0]]), centroids)[0]) == 1
    assert weighted_distortion(v, torch.tensor([[100.0, 1.0]]), centroids) == pytest.approx(1.0 + 36.0)


# ----------------------------------------------------------------------------- centroid refinement


def _layer(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    x = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.5 * torch.randn(n, n, generator=g))
    return w, x.T @ x / x.shape[0]


def _initial_codebook(w: torch.Tensor, h: torch.Tensor, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = w.shape
    vectors = w.reshape(m, n // d, d).reshape(-1, d)
    weights = h.diagonal().reshape(1, n // d, d).expand(m, -1, -1).reshape(-1, d)
    centroids = weighted_kmeans(vectors, weights, k, iterations=10, seed=0)
    codes = weighted_assign(vectors, weights, centroids).reshape(m, n // d)
    return centroids, codes


def test_refine_centroids_never_increases_the_hessian_loss() -> None:
    for seed in range(5):
        w, h = _layer(48, 16, seed)
        centroids, codes = _initial_codebook(w, h, 4, 16)
        before = hessian_loss(w, codes, centroids, h, 4)
        refined = refine_centroids(w, codes, h, 4, 16, centroids=centroids)
        after = hessian_loss(w, codes, refined, h, 4)
        assert refined.shape == (16, 4) and refined.dtype == torch.float32
        assert after <= before
        assert after < 0.99 * before  # correlated H: the diagonal fit is improvable


def test_refine_group_codebooks_lowers_the_layer_loss_across_coupled_groups() -> None:
    d, k, bounds = 2, 8, [0, 6, 12, 16]
    for seed in range(4):
        w, h = _layer(40, 16, seed)
        books, codes = [], []
        for a, b in zip(bounds, bounds[1:]):
            book, code = _initial_codebook(w[:, a:b], h[a:b, a:b], d, k)
            books.append(book.to(torch.float16).to(torch.float32))
            codes.append(code)

        def layer_loss(cbs: list[torch.Tensor]) -> float:
            q = torch.cat([cb[c].reshape(40, -1) for cb, c in zip(cbs, codes)], dim=1).to(torch.float64)
            err = w.to(torch.float64) - q
            return float(((err @ h.to(torch.float64)) * err).sum())

        refined = refine_group_codebooks(w, codes, books, bounds, h, d)
        assert all(r.shape == (k, d) for r in refined)
        assert all(torch.equal(r, r.to(torch.float16).to(torch.float32)) for r in refined)  # stored as float16
        assert layer_loss(refined) < 0.95 * layer_loss(books)
        # Refining each group alone against W (ignoring the coupling through H) does worse.
        alone = [refine_centroids(w[:, a:b], c, h[a:b, a:b], d, k, centroids=cb).to(torch.float16).to(torch.float32)
                 for (a, b), c, cb in zip(zip(bounds, bounds[1:]), codes, books)]
        assert layer_loss(refined) < layer_loss(alone)
    book, code = _initial_codebook(w, h, d, k)
    one = refine_group_codebooks(w, [code], [book], [0, 16], h, d)  # one group: no coupling
    expected = refine_centroids(w, code, h, d, k, centroids=book)
    torch.testing.assert_close(one[0], expected.to(torch.float16).to(torch.float32))


def _ldlq_rounding(w: torch.Tensor, h: torch.Tensor, d: int):
    """Compensate's rounding of one group: BlockLDLQ, each block's nearest codeword in its pivot's metric."""
    metrics = ldlq_block_metrics(h, d)

    def round_codes(books: list[torch.Tensor]) -> list[torch.Tensor]:
        book = books[0]

        def assign(targets: torch.Tensor, block: int) -> torch.Tensor:
            return book[assign_in_metric(targets.to(torch.float32), book, metrics[block])].to(targets.dtype)

        q = block_ldlq(w.to(torch.float64), h, assign, d=d)
        return [assign_nearest(q.reshape(-1, d).to(torch.float32), book).reshape(w.shape[0], -1)]

    return round_codes


def test_alternating_rounding_and_refinement_recovers_from_an_outlier_channel() -> None:
    # One input channel carries 1e4 times the energy of the rest (a "massive activation"): refining the
    # codebook for fixed codes bends codewords toward that column's weights; re-rounding frees the others.
    d, k, m, n = 2, 16, 96, 64
    for seed in range(3):
        w, h = _layer(m, n, seed)
        scale = torch.ones(n)
        scale[5] = 100.0
        h = scale[:, None] * h * scale[None, :]
        book, _ = _initial_codebook(w, torch.eye(n), d, k)  # fitted ignoring H: a poor start for column 5
        book = book.to(torch.float16).to(torch.float32)
        round_codes = _ldlq_rounding(w, h, d)
        codes = round_codes([book])
        once_codes, once_books, once = alternate_codes_and_codebooks(w, codes, [book], [0, n], h, d, round_codes, rounds=1)
        assert torch.equal(once_codes[0], codes[0])
        torch.testing.assert_close(once_books[0], refine_group_codebooks(w, codes, [book], [0, n], h, d)[0])
        final_codes, final_books, losses = alternate_codes_and_codebooks(w, codes, [book], [0, n], h, d, round_codes, rounds=4)
        assert all(b <= a for a, b in zip(losses, losses[1:]))
        assert losses[-1] == layer_hessian_loss(w, final_codes, final_books, h, d)
        assert losses[-1] < 0.8 * once[-1], (once, losses)
        # A re-rounding that does not lower the loss is refused, and the loop stops there.
        worse = lambda books: [torch.zeros_like(codes[0])]  # noqa: E731
        kept_codes, _, kept = alternate_codes_and_codebooks(w, codes, [book], [0, n], h, d, worse, rounds=4)
        assert torch.equal(kept_codes[0], codes[0]) and len(kept) == 2


def test_refine_centroids_solves_the_least_squares_exactly_on_a_small_problem() -> None:
    m, n, d, k = 20, 8, 2, 6
    w, h = _layer(m, n, 11)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, k - 1, (m, n // d), generator=g)  # codeword k-1 is never used
    start = torch.randn(k, d, generator=g)
    refined = refine_centroids(w, codes, h, d, k, centroids=start, iterations=200, damping=1e-12)
    # Dense normal equations: sum_r P_r^T H P_r c = sum_r P_r^T H w_r.
    h64, w64 = h.to(torch.float64), w.to(torch.float64)
    system = torch.zeros(k * d, k * d, dtype=torch.float64)
    rhs = torch.zeros(k * d, dtype=torch.float64)
    for r in range(m):
        select = torch.zeros(n, k * d, dtype=torch.float64)
        for a in range(n // d):
            for j in range(d):
                select[a * d + j, int(codes[r, a]) * d + j] = 1.0
        system += select.T @ h64 @ select
        rhs += select.T @ h64 @ w64[r]
    used = slice(0, (k - 1) * d)
    exact = torch.linalg.solve(system[used, used], rhs[used]).reshape(k - 1, d)
    torch.testing.assert_close(refined[: k - 1].to(torch.float64), exact, rtol=1e-4, atol=1e-4)
    assert torch.equal(refined[k - 1], start[k - 1])  # the empty codeword is unchanged


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivities_follow_their_formulas() -> None:
    w, h_i = _layer(6, 8, 3)
    h_o_full = torch.diag(torch.arange(1.0, 7.0)) + 0.1
    local = local_sensitivity(w, h_i)
    expected = torch.stack([h_i[c, c] * (w[:, c] ** 2).sum() for c in range(8)]).to(torch.float64)
    torch.testing.assert_close(local, expected)
    value = global_sensitivity(h_i, h_o_full, w)
    manual = float(h_o_full.diagonal().mean() * h_i.diagonal().mean() * (w**2).sum() / 48)
    assert value == pytest.approx(manual, rel=1e-6)
    assert global_sensitivity(h_i, h_o_full.diagonal(), w) == pytest.approx(value, rel=1e-12)
    assert global_sensitivity(h_i, h_o_full, w, 7.5) == pytest.approx(7.5 * value, rel=1e-12)
    with pytest.raises(ValueError):
        global_sensitivity(h_i, h_o_full, w, 0.0)


def test_global_sensitivity_with_kronecker_scale_is_the_fisher_trace_per_weight() -> None:
    # i.i.d. errors of variance sigma^2 cost sigma^2 tr(F), tr(F) = sum_t |g_t|^2 |x_t|^2: the total over
    # tokens, so a layer that reads twice the tokens (with the same per-token statistics) weighs twice.
    g = torch.Generator().manual_seed(3)
    m, n, tokens = 5, 7, 40
    x = torch.randn(tokens, n, generator=g) * torch.rand(tokens, 1, generator=g)
    grad = torch.randn(tokens, m, generator=g) * torch.rand(tokens, 1, generator=g)
    w = torch.randn(m, n, generator=g)
    once = new_statistics(n, m, gradients=True, full_output_hessian=True)
    accumulate(once, x, grad)
    twice = new_statistics(n, m, gradients=True, full_output_hessian=True)
    accumulate(twice, x, grad)
    accumulate(twice, x, grad)
    fisher_trace = float(((grad.double() ** 2).sum(1) * (x.double() ** 2).sum(1)).sum())
    expected = fisher_trace / (m * n) * float((w.double() ** 2).sum()) / (m * n)
    value = global_sensitivity(once.h_i, once.h_o, w, kronecker_scale(once))
    assert value == pytest.approx(expected, rel=1e-5)
    assert global_sensitivity(twice.h_i, twice.h_o, w, kronecker_scale(twice)) == pytest.approx(2 * value, rel=1e-5)
    # Without the scale, the normalised factors cannot tell the two apart.
    assert global_sensitivity(twice.h_i, twice.h_o, w) == pytest.approx(global_sensitivity(once.h_i, once.h_o, w), rel=1e-5)
    # Without token importance, H_I is H_X / T and the scale still restores the Fisher trace.
    uniform = new_statistics(n, m, gradients=True, full_output_hessian=False)
    accumulate(uniform, x, grad, token_importance=False)
    torch.testing.assert_close(uniform.h_i, uniform.h_x / tokens)
    assert global_sensitivity(uniform.h_i, uniform.h_o, w, kronecker_scale(uniform)) == pytest.approx(expected, rel=1e-5)


def test_channel_groups_permutation_and_bounds() -> None:
    scores = torch.rand(40, generator=torch.Generator().manual_seed(0))
    perm, bounds = channel_groups(scores, 3, 4)
    assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(40))
    assert bool((scores[perm][1:] <= scores[perm][:-1]).all())
    assert bounds[0] == 0 and bounds[-1] == 40 and len(bounds) == 4
    widths = [b - a for a, b in zip(bounds, bounds[1:])]
    assert all(x % 4 == 0 and x > 0 for x in widths) and max(widths) - min(widths) <= 4
    assert widths == [16, 12, 12]
    _, few = channel_groups(torch.rand(8), 4, 4)  # only 2 vectors wide: 2 groups
    assert few == [0, 4, 8]
    with pytest.raises(InputError):
        channel_groups(torch.rand(10), 2, 4)
    s = group_sensitivities(scores, perm, bounds, 2.0)
    assert s[0] >= s[1] >= s[2]
    assert group_sensitivities(torch.ones(40), perm, bounds, 2.0) == [2.0, 2.0, 2.0]


# ----------------------------------------------------------------------------- allocation


def _random_problem(rng: np.random.Generator) -> tuple[list[GroupSpec], int, int]:
    groups = []
    for _ in range(int(rng.integers(1, 25))):
        d = int(rng.choice([1, 2, 4]))
        count = int(rng.integers(1, 400)) * d * int(rng.choice([1, 64, 1024]))
        groups.append(
            GroupSpec(
                count=count,
                sensitivity=float(rng.lognormal(0.0, 2.0)),
                d=d,
                fixed_bits=int(rng.integers(0, 5000)),
                codebook=bool(rng.random() < 0.8),
            )
        )
    overhead = int(rng.integers(0, 10000))
    low = stored_bits(groups, [1] * len(groups), overhead)
    high = stored_bits(groups, [4] * len(groups), overhead)
    budget = int(rng.integers(low - (high - low) // 10, high + (high - low) // 10 + 1))
    return groups, budget, overhead


def test_allocation_never_exceeds_the_budget_and_leaves_less_than_one_step() -> None:
    rng = np.random.default_rng(0)
    solved = 0
    for _ in range(200):
        groups, budget, overhead = _random_problem(rng)
        if stored_bits(groups, [1] * len(groups), overhead) > budget:
            with pytest.raises(RecipeError):
                allocate_bits_total(groups, budget, overhead_bits=overhead)
            continue
        bits = allocate_bits_total(groups, budget, overhead_bits=overhead)
        total = stored_bits(groups, bits, overhead)
        assert total <= budget
        slack = budget - total
        for g, b in zip(groups, bits):
            assert b in (1, 2, 3, 4)
            if b < 4:
                assert group_cost_bits(g, b + 1) - group_cost_bits(g, b) > slack
        solved += 1
    assert solved > 150


def test_allocation_is_near_optimal_on_small_problems() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        groups = [
            GroupSpec(count=int(rng.integers(1, 50)) * 256, sensitivity=float(rng.lognormal(0, 2)), d=2)
            for _ in range(5)
        ]
        budget = stored_bits(groups, [2] * 5)
        bits = allocate_bits_total(groups, budget)

        def loss(assignment: tuple[int, ...]) -> float:
            return sum(g.sensitivity * g.count * 2.0 ** (-2 * b) for g, b in zip(groups, assignment))

        best = min(
            loss(a) for a in itertools.product((1, 2, 3, 4), repeat=5) if stored_bits(groups, a) <= budget
        )
        assert loss(tuple(bits)) <= loss((2,) * 5) + 1e-9  # never worse than uniform at this budget
        assert loss(tuple(bits)) <= 1.05 * best


def test_more_sensitive_groups_never_get_fewer_bits() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        shapes = [(4096 * 64, 4), (512 * 128, 4), (1024 * 32, 2)]
        groups = []
        for _ in range(int(rng.integers(2, 20))):
            count, d = shapes[int(rng.integers(0, 3))]
            groups.append(GroupSpec(count=count, sensitivity=float(rng.lognormal(0, 1.5)), d=d, fixed_bits=96))
        low = stored_bits(groups, [1] * len(groups))
        high = stored_bits(groups, [4] * len(groups))
        bits = allocate_bits_total(groups, int(rng.integers(low, high + 1)))
        for (ga, ba), (gb, bb) in itertools.combinations(zip(groups, bits), 2):
            if (ga.count, ga.d) == (gb.count, gb.d) and ga.sensitivity != gb.sensitivity:
                more, fewer = (ba, bb) if ga.sensitivity > gb.sensitivity else (bb, ba)
                assert more >= fewer


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_uniform_budget_with_equal_sensitivities_gives_everyone_b(b: int) -> None:
    groups = [GroupSpec(count=4096 * 256, sensitivity=3.0, d=4, fixed_bits=64) for _ in range(6)]
    assert allocate_bits_total(groups, stored_bits(groups, [b] * 6)) == [b] * 6
    # Shared codebooks and byte-aligned sizes: a budget of b bits per weight is exactly uniform b.
    shared = [GroupSpec(count=c, sensitivity=1.0, d=4, codebook=False) for c in (512, 4096, 65536, 8)]
    assert allocate_bits(shared, float(b)) == [b] * 4


def test_distortion_models() -> None:
    assert [relative_distortion(b) for b in (1, 2, 3, 4)] == [0.25, 0.0625, 0.015625, 0.00390625]
    compensated = [relative_distortion(b, COMPENSATED_STEPS) for b in range(1, 9)]
    steps = [a / b for a, b in zip(compensated, compensated[1:])]
    # Measured: the step from 1 bit gains far more than 4x, the step to 4 bits less; the high-rate law beyond.
    assert steps[0] > 5.0 and steps[0] > steps[1] > 4.0 > steps[2] and steps[3:] == pytest.approx([4.0] * 4)
    assert relative_distortion(3, (2.0, 3.0)) == pytest.approx(0.25 / 6.0)
    with pytest.raises(ValueError, match="must be > 1"):
        relative_distortion(2, (4.0, 0.5))
    with pytest.raises(ValueError, match="start at 1"):
        relative_distortion(0, COMPENSATED_STEPS)


def test_compensated_distortion_keeps_insensitive_groups_off_one_bit() -> None:
    # Sensitivities 1 : 5 at a 2-bit budget: the 4x-per-bit law pays 1 + 3 bits, the measured curve 2 + 2.
    groups = [GroupSpec(count=4096 * 256, sensitivity=s, d=2, codebook=False) for s in (1.0, 5.0)]
    assert allocate_bits(groups, 2.0) == [1, 3]
    assert allocate_bits(groups, 2.0, distortion_steps=COMPENSATED_STEPS) == [2, 2]
    rng = np.random.default_rng(3)
    for _ in range(50):
        groups, budget, overhead = _random_problem(rng)
        if stored_bits(groups, [1] * len(groups), overhead) > budget:
            continue
        bits = allocate_bits_total(groups, budget, overhead_bits=overhead, distortion_steps=COMPENSATED_STEPS)
        total = stored_bits(groups, bits, overhead)
        assert total <= budget
        assert all(b == 4 or group_cost_bits(g, b + 1) - group_cost_bits(g, b) > budget - total
                   for g, b in zip(groups, bits))


def test_minimum_widths_hold_and_the_budget_is_still_met() -> None:
    rng = np.random.default_rng(4)
    for _ in range(100):
        groups, budget, overhead = _random_problem(rng)
        floors = [int(rng.choice([0, 0, 2, 3])) for _ in groups]
        groups = [dataclasses.replace(g, min_bits=f) for g, f in zip(groups, floors)]
        narrowest = [max(1, f) for f in floors]
        if stored_bits(groups, narrowest, overhead) > budget:
            with pytest.raises(RecipeError, match="narrowest allowed"):
                allocate_bits_total(groups, budget, overhead_bits=overhead)
            continue
        bits = allocate_bits_total(groups, budget, overhead_bits=overhead)
        total = stored_bits(groups, bits, overhead)
        assert total <= budget
        assert all(b >= f for b, f in zip(bits, floors))
        assert all(b == 4 or group_cost_bits(g, b + 1) - group_cost_bits(g, b) > budget - total
                   for g, b in zip(groups, bits))
    # The least sensitive group would take 1 bit; its floor lifts it to 2 and the others pay.
    groups = [GroupSpec(count=4096 * 256, sensitivity=s, d=2, codebook=False) for s in (1.0, 5.0, 6.0)]
    assert allocate_bits(groups, 2.0) == [1, 2, 3]
    floored = [dataclasses.replace(groups[0], min_bits=2), *groups[1:]]
    assert allocate_bits(floored, 2.0) == [2, 2, 2]
    with pytest.raises(RecipeError, match="exceeds the widest"):
        allocate_bits([dataclasses.replace(groups[0], min_bits=4)], 2.0, allowed=(1, 2, 3))


def test_allocation_report_and_infeasible_budget() -> None:
    groups = [GroupSpec(count=4096 * 1024, sensitivity=s, d=4) for s in (1.0, 10.0, 100.0, 0.1)]
    bits = allocate_bits(groups, 2.01)
    budget = math.floor(Fraction(2.01) * 4 * 4096 * 1024)
    summary = summarize_allocation(groups, bits, budget_bits=budget)
    assert summary.total_bits <= summary.budget_bits
    # Codebooks make 2+2+2+2 affordable but 1+2+3+1 models a lower loss; one more step never fits.
    assert bits == [1, 2, 3, 1]
    assert summary.bits_per_weight <= 2.01 and summary.index_bits_per_weight == 1.75
    assert summary.index_bits_per_weight < summary.bits_per_weight
    assert bits[2] >= bits[1] >= bits[0] >= bits[3]
    with pytest.raises(RecipeError):
        allocate_bits(groups, 0.5)


def test_measured_steps_are_geometric_means_of_layer_ratios() -> None:
    layers = [{1: 8.0, 2: 1.0, 3: 0.5}, {1: 2.0, 2: 1.0, 3: 0.125}]
    assert measured_steps(layers, (1, 2, 3)) == pytest.approx((4.0, 4.0))  # sqrt(8 * 2), sqrt(2 * 8)
    # a gap of two widths spreads its ratio evenly over both bits; order of the widths does not matter
    assert measured_steps(layers, (3, 1)) == pytest.approx((4.0, 4.0))
    # layers without a finite positive ratio are left out of that pair only
    assert measured_steps([*layers, {1: 1.0, 2: 0.0, 3: 0.0}], (1, 2, 3)) == pytest.approx((4.0, 4.0))
    # no gain from a bit is priced as almost none, never as a loss
    assert measured_steps([{1: 1.0, 2: 2.0}], (1, 2)) == (MIN_MEASURED_STEP,)
    with pytest.raises(ValueError, match="between 1 and 2 bits"):
        measured_steps([{1: float("nan"), 2: 1.0}], (1, 2))


def test_widths_near_the_budget() -> None:
    from mgvq_compile.algorithms.allocation import widths_near_budget
    from mgvq_compile.errors import RecipeError

    assert widths_near_budget(2.0, 8) == (1, 2, 3)
    assert widths_near_budget(3.0, 8) == (2, 3, 4)
    assert widths_near_budget(2.5, 8) == (2, 3)
    assert widths_near_budget(1.0, 8) == (1, 2)
    assert widths_near_budget(0.5, 8) == (1,)
    assert widths_near_budget(8.0, 8) == (7, 8)
    with pytest.raises(RecipeError, match="within one bit"):
        widths_near_budget(10.0, 8)


def test_fractional_widths_cost_whole_code_bits_and_hold_the_budget() -> None:
    from mgvq_compile.algorithms.allocation import code_bits, widths_near_budget

    group = GroupSpec(count=96 * 64, sensitivity=1.0, d=4)
    # 1.75 bits per weight at d = 4: 7-bit codes, 1536 vectors, a 128-entry codebook of 4 fp16 values
    assert code_bits(1.75, 4) == 7
    assert group_cost_bits(group, 1.75) == 1536 * 7 + 128 * 4 * 16
    assert group_cost_bits(group, 2) == group_cost_bits(group, 2.0) == 1536 * 8 + 256 * 4 * 16
    with pytest.raises(RecipeError, match="whole, positive number of code bits"):
        code_bits(1.6, 4)
    assert widths_near_budget(2.0, 4.0, Fraction(1, 4)) == (1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3)
    assert widths_near_budget(2.0, 2.5, Fraction(1, 2)) == (1, 1.5, 2, 2.5)
    # Between whole widths the modelled loss falls geometrically: half a bit divides it by sqrt(step).
    assert relative_distortion(1.5) == pytest.approx(0.25 / 2.0)
    assert relative_distortion(2.25, COMPENSATED_STEPS) == pytest.approx(
        relative_distortion(2, COMPENSATED_STEPS) / COMPENSATED_STEPS[1] ** 0.25)

    rng = np.random.default_rng(7)
    allowed = widths_near_budget(2.0, 4.0, Fraction(1, 4))
    for _ in range(100):
        groups = [GroupSpec(count=int(rng.integers(1, 300)) * 4 * int(rng.choice([1, 64, 512])),
                            sensitivity=float(rng.lognormal(0.0, 2.0)), d=4) for _ in range(int(rng.integers(1, 20)))]
        low, high = stored_bits(groups, [1] * len(groups)), stored_bits(groups, [3] * len(groups))
        budget = int(rng.integers(low, high + 1))
        bits = allocate_bits_total(groups, budget, allowed)
        total = stored_bits(groups, bits)
        assert total <= budget and all(b in allowed for b in bits)
        slack = budget - total
        for g, b in zip(groups, bits):  # no single step up (a quarter bit) still fits
            if b < 3:
                assert group_cost_bits(g, b + 0.25) - group_cost_bits(g, b) > slack
