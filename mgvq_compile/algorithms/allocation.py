"""Bit allocation under a model-wide budget of stored bits (method page, sections 2 and 5).

A group is one (layer, channel group): ``count`` = m * n_g weights (m rows, n_g permuted columns),
cut into count / d vectors of d weights. At b bits per weight (a multiple of 1 / d: each vector's code
is b*d whole bits) it stores exactly what :class:`mgvq_compile.vqgemm.VQWeight` writes for it:
- its codes, count / d vectors at b*d bits, packed on their own whole bytes: 8 * ceil(count * b / 8);
- its float16 codebook, 2^(b*d) * d * 16 bits (unless the codebook is shared, ``codebook=False``);
- ``fixed_bits`` that do not depend on b (e.g. its layer's int32 permutation, group bounds, scales:
  put a layer's fixed overhead on one of its groups, or pass model-wide overhead as ``overhead_bits``).

:func:`allocate_bits` minimises the modelled loss sum_g S_g * count_g * D(b_g) subject to
``stored_bits(groups, bits) <= budget`` with budget = floor(budget_bits_per_weight * total weights),
by the Lagrangian (bisection on the multiplier), a local search of budget-neutral exchanges (one
group up, one other down: codebook overheads make the per-group curves non-convex, which the
Lagrangian alone cannot see), then a greedy fill of the remaining slack. D(b) is the relative
distortion of a b-bit quantizer (:func:`relative_distortion`), given by its steps loss(b) / loss(b+1):
4 each for the high-rate law 2^(-2b), or a measured curve such as COMPENSATED_STEPS: the compensated
error of real layers falls much faster than 4x per bit at low widths (error feedback cannot absorb a
1-bit codebook's error) and slower at 4 bits. This is a heuristic: on
adversarial tiny groups where a 4-bit d=4 codebook (4 Mbit) dwarfs the codes, moves involving three
groups can be needed and the modelled loss can be up to ~2x the exact optimum.

"Exactly on budget" means: the stored total never exceeds the budget, and the slack left
(budget - total) is smaller than the cost of every single one-step upgrade still available (raising one
group to its next allowed width); the slack can be zero only when such a step fits perfectly. Budget
and costs are integers of bits, so no rounding can break this.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np

from mgvq_compile.algorithms.packing import code_width
from mgvq_compile.errors import RecipeError

__all__ = [
    "GroupSpec",
    "AllocationSummary",
    "group_cost_bits",
    "stored_bits",
    "allocate_bits",
    "allocate_bits_total",
    "summarize_allocation",
    "COMPENSATED_STEPS",
    "relative_distortion",
    "measured_steps",
    "widths_near_budget",
    "code_bits",
    "as_width",
    "HIGH_RATE_STEP",
]

logger = logging.getLogger(__name__)

DEFAULT_ALLOWED = (1, 2, 3, 4)
_BISECTION_STEPS = 200

HIGH_RATE_STEP = 4.0  # 2^(-2b): each extra bit divides the error by 4
# loss(b) / loss(b + 1) of the proxy loss tr(E H_I E^T) after BlockLDLQ compensation, d = 2, uniform
# widths: geometric mean over the layers of Whisper tiny.en (64; 6.8, 4.8, 3.2) and SmolLM2-135M (210;
# 4.8, 4.0), seed 0 (benchmarks/distortion.py); 3 -> 4 from Whisper alone.
COMPENSATED_STEPS = (5.2, 4.2, 3.2)


def as_width(bits: float) -> int | float:
    """A width as written in configs and reports: an int when it is whole (2, not 2.0)."""
    return int(bits) if float(bits).is_integer() else float(bits)


def code_bits(bits: float, d: int) -> int:
    """The code width b*d of a vector of ``d`` weights at ``bits`` per weight, as a recipe error when it is
    not whole (see :func:`~mgvq_compile.algorithms.packing.code_width`)."""
    try:
        return code_width(bits, d)
    except ValueError:
        raise RecipeError(f"{bits:g} bits per weight at d={d} is not a whole, positive number of code bits "
                          f"per vector", f"use multiples of 1/{d} bits per weight") from None


def widths_near_budget(budget_bits_per_weight: float, max_width: float, step: Fraction = Fraction(1)) -> tuple:
    """The widths w >= 1 with |w - budget| <= 1, at most ``max_width``, in steps of ``step`` bits per weight
    (1: whole bits; 1/d: every whole code width of d-dimensional vectors).

    Widths further out let the allocation trade many 1-bit groups for a few wide ones; measured with
    3 seeds on SmolLM2 and Whisper tiny.en, (1, 2, 3) beat (1, 2, 3, 4) at a 2-bit budget and (2, 3, 4)
    beat it at 3 bits (README, Status).
    """
    budget = Fraction(budget_bits_per_weight).limit_denominator(1 << 20)
    low = max(math.ceil(1 / step), math.ceil((budget - 1) / step))
    high = min(math.floor(Fraction(max_width) / step), math.floor((budget + 1) / step))
    if low > high:
        raise RecipeError(f"no bit width within one bit of a {budget_bits_per_weight:g}-bit budget fits "
                          f"(at most {max_width:g} bits)", "lower --bits, or give assign-bits.allowed_bits")
    return tuple(as_width(k * step) for k in range(low, high + 1))


def relative_distortion(bits: float, steps: Sequence[float] = ()) -> float:
    """D(b) = 2^(-2) / (step_1 * ... * step_(b-1)): the error at b bits relative to the weight energy.

    step_k = loss(k) / loss(k + 1) is ``steps[k - 1]``, and HIGH_RATE_STEP past the given steps, so
    ``steps=()`` is the high-rate law 2^(-2b). Between whole widths the loss falls geometrically: a
    fraction f of bit k + 1 divides it by step_k^f.
    """
    if bits < 1:
        raise ValueError(f"bit widths start at 1, got {bits}")
    if any(not step > 1.0 for step in steps):
        raise ValueError(f"every distortion step must be > 1 (the error falls with each bit), got {list(steps)}")
    whole, fraction = int(math.floor(bits)), bits - math.floor(bits)

    def step(k: int) -> float:
        return steps[k - 1] if k <= len(steps) else HIGH_RATE_STEP

    loss = 0.25 / math.prod(step(k) for k in range(1, whole))
    return loss / step(whole) ** fraction if fraction else loss


MIN_MEASURED_STEP = 1.01  # a measured step at or below 1 (no gain from a bit) is priced as almost none


def measured_steps(losses: Sequence[Mapping[int, float]], widths: Sequence[int]) -> tuple[float, ...]:
    """Steps loss(b) / loss(b + 1) for b = widths[0] .. widths[-1] - 1 from per-layer losses by width.

    Each consecutive pair of measured widths gets the geometric mean over layers of loss(low) / loss(high)
    (layers whose ratio is not finite and positive left out), spread evenly over the bits it spans.
    """
    widths = sorted(widths)
    steps: list[float] = []
    for low, high in zip(widths, widths[1:]):
        ratios = np.array([layer[low] / layer[high] if layer[high] > 0 else np.inf for layer in losses], dtype=np.float64)
        ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
        if ratios.size == 0:
            raise ValueError(f"no layer has a finite, positive loss ratio between {low} and {high} bits")
        per_bit = float(np.exp(np.log(ratios).mean() / (high - low)))
        if per_bit < MIN_MEASURED_STEP:
            logger.warning("measured loss ratio %d -> %d bits is %.3f per bit (no gain); priced as %.2f",
                           low, high, per_bit, MIN_MEASURED_STEP)
            per_bit = MIN_MEASURED_STEP
        steps += [per_bit] * (high - low)
    return tuple(steps)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """One (layer, channel group): ``count`` weights, sensitivity S, vector dimension d."""

    count: int
    sensitivity: float
    d: int = 4
    fixed_bits: int = 0
    codebook: bool = True  # False: the codebook is shared and counted in ``overhead_bits`` instead
    min_bits: float = 0  # the narrowest width this group may get (0: any allowed width)

    def __post_init__(self) -> None:
        if self.count <= 0 or self.d <= 0 or self.count % self.d:
            raise ValueError(f"a group needs a positive count divisible by d, got count={self.count}, d={self.d}")
        if self.min_bits < 0:
            raise ValueError(f"min_bits must be non-negative, got {self.min_bits}")
        if not self.sensitivity >= 0.0 or math.isinf(self.sensitivity):
            raise ValueError(f"sensitivity must be finite and non-negative, got {self.sensitivity}")
        if self.fixed_bits < 0:
            raise ValueError("fixed_bits must be non-negative")


@dataclasses.dataclass(frozen=True)
class AllocationSummary:
    total_bits: int
    weights: int
    bits_per_weight: float  # everything stored / weights
    index_bits_per_weight: float  # codes only / weights
    budget_bits: int | None = None


def _index_bits(group: GroupSpec, bits: float) -> int:
    return 8 * (((group.count // group.d) * code_bits(bits, group.d) + 7) // 8)


def group_cost_bits(group: GroupSpec, bits: float) -> int:
    """Every bit stored for ``group`` at ``bits`` bits per weight (see the module docstring)."""
    codebook = (1 << code_bits(bits, group.d)) * group.d * 16 if group.codebook else 0
    return _index_bits(group, bits) + codebook + group.fixed_bits


def stored_bits(groups: Sequence[GroupSpec], bits: Sequence[float], overhead_bits: int = 0) -> int:
    """Total bits stored for ``groups`` at widths ``bits``, plus model-wide ``overhead_bits``."""
    if len(groups) != len(bits):
        raise ValueError("one bit width per group is needed")
    return overhead_bits + sum(group_cost_bits(g, b) for g, b in zip(groups, bits))


def summarize_allocation(
    groups: Sequence[GroupSpec], bits: Sequence[float], overhead_bits: int = 0, budget_bits: int | None = None
) -> AllocationSummary:
    weights = sum(g.count for g in groups)
    total = stored_bits(groups, bits, overhead_bits)
    index = sum(_index_bits(g, b) for g, b in zip(groups, bits))
    return AllocationSummary(total, weights, total / weights, index / weights, budget_bits)


def _sort_within_identical(groups: Sequence[GroupSpec], choice: np.ndarray) -> np.ndarray:
    """Among groups with identical cost functions, give the larger widths to the more sensitive.

    Same multiset of widths, so the same cost; by the rearrangement inequality the loss can only drop.
    This makes "more sensitive never gets fewer bits" hold even on floating-point near-ties.
    """
    out = choice.copy()
    classes: dict[tuple[int, int, int, bool, float], list[int]] = {}
    for i, g in enumerate(groups):
        classes.setdefault((g.count, g.d, g.fixed_bits, g.codebook, g.min_bits), []).append(i)
    for members in classes.values():
        if len(members) < 2:
            continue
        by_sensitivity = sorted(members, key=lambda i: (groups[i].sensitivity, -i))
        out[by_sensitivity] = np.sort(choice[members])
    return out


def _fill_slack(cost: np.ndarray, loss: np.ndarray, choice: np.ndarray, available: int) -> np.ndarray:
    """Greedy repair: take the fitting one-step upgrade with the best loss drop per bit, until none fits."""
    choice = choice.copy()
    rows = np.arange(cost.shape[0])
    last = cost.shape[1] - 1
    while True:
        slack = available - int(cost[rows, choice].sum())
        can = choice < last
        nxt = np.minimum(choice + 1, last)
        step = cost[rows, nxt] - cost[rows, choice]
        fits = can & (step <= slack)
        if not fits.any():
            return choice
        ratio = np.where(fits, (loss[rows, choice] - loss[rows, nxt]) / np.maximum(step, 1), -np.inf)
        choice[int(np.argmax(ratio))] += 1


def _improve_by_exchanges(
    cost: np.ndarray, loss: np.ndarray, choice: np.ndarray, available: int, max_moves: int = 1000
) -> np.ndarray:
    """Local search over "one group up to any wider width, another down to any narrower one (or none)".

    The Lagrangian only reaches points on the lower convex hull of each group's (cost, loss) curve;
    codebook overheads make those curves non-convex, and these exchanges recover much of the gap.
    Every move strictly lowers the modelled loss and keeps the budget, so the search ends.
    """
    choice = choice.copy()
    n_groups, n_widths = cost.shape
    rows = np.arange(n_groups)
    owner = np.repeat(rows, n_widths)
    target = np.tile(np.arange(n_widths), n_groups)
    for _ in range(max_moves):
        current_cost = cost[rows, choice]
        current_loss = loss[rows, choice]
        slack = available - int(current_cost.sum())
        d_cost = (cost - current_cost[:, None]).reshape(-1)
        d_loss = (loss - current_loss[:, None]).reshape(-1)
        is_up = (target > choice[owner]) & (d_loss < 0)
        is_down = target < choice[owner]
        ups = np.flatnonzero(is_up)
        if ups.size == 0:
            return choice
        # Column 0 is "no downgrade".
        downs = np.flatnonzero(is_down)
        down_cost = np.concatenate([[0], d_cost[downs]])
        down_loss = np.concatenate([[0.0], d_loss[downs]])
        down_owner = np.concatenate([[-1], owner[downs]])
        feasible = (d_cost[ups][:, None] + down_cost[None, :]) <= slack
        feasible &= owner[ups][:, None] != down_owner[None, :]
        net = np.where(feasible, -(d_loss[ups][:, None] + down_loss[None, :]), -np.inf)
        i, j = np.unravel_index(int(np.argmax(net)), net.shape)
        threshold = 1e-12 * max(float(current_loss.sum()), 1e-300)
        if not net[i, j] > threshold:
            return choice
        choice[owner[ups[i]]] = target[ups[i]]
        if j > 0:
            choice[owner[downs[j - 1]]] = target[downs[j - 1]]
    return choice


def allocate_bits_total(
    groups: Sequence[GroupSpec],
    budget_bits: int,
    allowed: Sequence[float] = DEFAULT_ALLOWED,
    *,
    overhead_bits: int = 0,
    distortion_steps: Sequence[float] = (),
) -> list[int | float]:
    """Bit width per group with ``stored_bits(groups, result, overhead_bits) <= budget_bits``; no group gets
    less than its ``min_bits``.

    Raises :class:`RecipeError` when even the smallest allowed width for every group does not fit.
    """
    if not groups:
        return []
    widths = sorted({as_width(b) for b in allowed})
    if not widths or widths[0] <= 0:
        raise RecipeError(f"allowed bit widths must be positive, got {list(allowed)}")
    too_wide = sorted({g.min_bits for g in groups if g.min_bits > widths[-1]})
    if too_wide:
        raise RecipeError(f"a group's minimum width {too_wide[-1]} exceeds the widest allowed width {widths[-1]}",
                          "lower the minimum, or allow wider widths")
    cost = np.array([[group_cost_bits(g, b) for b in widths] for g in groups], dtype=np.int64)
    d_of_width = [relative_distortion(b, distortion_steps) for b in widths]
    # A width below a group's minimum has infinite loss: no choice, exchange or fill ever takes it.
    loss = np.array([[g.sensitivity * g.count * d_b if b >= g.min_bits else math.inf
                      for b, d_b in zip(widths, d_of_width)] for g in groups])
    rows = np.arange(len(groups))
    narrowest = np.array([next(j for j, b in enumerate(widths) if b >= g.min_bits) for g in groups])
    available = budget_bits - overhead_bits

    def total(choice: np.ndarray) -> int:
        return int(cost[rows, choice].sum())

    def choose(lam: float) -> np.ndarray:
        return np.argmin(loss + lam * cost, axis=1)  # ties go to the narrower width

    if total(narrowest) > available:
        raise RecipeError(
            f"a budget of {budget_bits} bits cannot hold even the narrowest allowed codes and their codebooks "
            f"({total(narrowest) + overhead_bits} bits)",
            "raise the average-bit budget, lower the groups' minimum widths (assign-bits.min_bits), allow a "
            "smaller width, use fewer/larger channel groups, or a smaller vector dimension (smaller codebooks: "
            "assign-bits.vector_dim=2)",
        )
    choice = choose(0.0)
    if total(choice) > available:
        lo, hi = 0.0, 1.0
        while total(choose(hi)) > available:
            lo, hi = hi, hi * 2.0
            if hi > 1e300:  # cannot happen while costs strictly grow with b; kept as a guard
                hi = math.inf
                break
        choice = choose(hi) if math.isfinite(hi) else narrowest.copy()
        if math.isfinite(hi):
            for _ in range(_BISECTION_STEPS):
                mid = 0.5 * (lo + hi) if lo == 0.0 else math.sqrt(lo * hi)
                if not lo < mid < hi:
                    break
                candidate = choose(mid)
                if total(candidate) <= available:
                    hi, choice = mid, candidate
                else:
                    lo = mid
        choice = _sort_within_identical(groups, choice)
    choice = _improve_by_exchanges(cost, loss, choice, available)
    choice = _fill_slack(cost, loss, choice, available)
    choice = _sort_within_identical(groups, choice)
    bits = [widths[j] for j in choice]
    summary = summarize_allocation(groups, bits, overhead_bits, budget_bits)
    logger.info(
        "allocated %d groups: %.4f bits/weight stored (%.4f index-only), %d of %d budget bits",
        len(groups), summary.bits_per_weight, summary.index_bits_per_weight, summary.total_bits, budget_bits,
    )
    return bits


def allocate_bits(
    groups: Sequence[GroupSpec],
    budget_bits_per_weight: float,
    allowed: Sequence[float] = DEFAULT_ALLOWED,
    *,
    overhead_bits: int = 0,
    distortion_steps: Sequence[float] = (),
) -> list[int | float]:
    """Bit width per group; the budget is floor(budget_bits_per_weight * total weights) stored bits."""
    weights = sum(g.count for g in groups)
    budget = math.floor(Fraction(budget_bits_per_weight) * weights)
    return allocate_bits_total(groups, budget, allowed, overhead_bits=overhead_bits,
                               distortion_steps=distortion_steps)
