"""AssignBits (MGVQ module 1): rank input channels by sensitivity, cut each layer into channel groups,
and allocate bit widths to all groups of the model under one budget that counts everything stored."""

from __future__ import annotations

import dataclasses
import logging

import torch

from mgvq_compile.algorithms.allocation import (
    COMPENSATED_STEPS,
    GroupSpec,
    allocate_bits,
    summarize_allocation,
    widths_near_budget,
)
from mgvq_compile.algorithms.sensitivity import channel_groups, global_sensitivity, group_sensitivities, local_sensitivity
from mgvq_compile.algorithms.statistics import kronecker_scale
from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import weight_matrix
from mgvq_compile.passes._common import MAX_CODE_BITS, layer_hessian
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass

__all__ = ["AssignBitsConfig", "AssignBits", "LayerAllocation"]

logger = logging.getLogger(__name__)

PERM_BITS = 32  # the column permutation is stored as int32
# The allocation's loss model D(b) by name: its steps loss(b) / loss(b + 1) from 1 bit (see
# allocation.relative_distortion; () is the high-rate law 2^(-2b)); "measured" takes the steps of the
# measure-distortion pass run before assign-bits (Recipe.with_options adds it when options ask for "measured").
MEASURED = "measured"
DISTORTION_MODELS = {"high-rate": (), "compensated": COMPENSATED_STEPS, MEASURED: None}


@dataclasses.dataclass(frozen=True)
class LayerAllocation:
    perm: torch.Tensor  # int64 [n]: permuted column j is original column perm[j] (identity for one group)
    vector_dim: int  # group widths are multiples of it; codebooks and rounding use it
    bounds: list[int]
    bits: list[int]
    sensitivity: list[float]  # S_g per channel group, the allocation's loss weights
    global_sensitivity: float


@dataclasses.dataclass(frozen=True)
class AssignBitsConfig(PassConfig):
    VERSION = 9  # 9: allowed widths near the budget by default; 8: the distortion model
    bits: float = 2.0  # model-wide budget in stored bits per quantized weight
    groups: int = 4
    # d = 2, not the method page's 4: 2^(b*d)-entry fp16 codebooks per group cost 0.28 bits/weight of a
    # 2-bit budget at d = 4 (34 % of SmolLM2's weights fell to 1 bit) and make 3-4 bit groups unaffordable;
    # measured at 2 bits, one seed: perplexity 2.9k at d = 2 vs 21.0k at d = 4.
    vector_dim: int = 2
    # () = the whole widths within one bit of the budget ((1, 2, 3) at 2 bits, (2, 3, 4) at 3), not the
    # method page's {1, 2, 3, 4}: 3 seeds each, SmolLM2 perplexity 164 vs 169 (2 bits) and 67.1 vs 68.4
    # (3 bits), Whisper NLL 5.79 vs 5.95 and 1.54 vs 1.93 (benchmarks/results/accuracy-bits{123,234}.md).
    allowed_bits: tuple[int, ...] = ()
    # The "no allocation" ablation: every group gets ``bits`` index bits per weight (a whole number), with
    # codebooks and permutation stored on top, as in gptvq; with groups = 1 no permutation is stored.
    uniform: bool = False
    # False: every layer's global sensitivity is 1, so layers compete by their local (H-weighted) error
    # alone; the ablation of the gradient-based global term.
    global_weighting: bool = True
    # The loss model D(b) of each width, a name in DISTORTION_MODELS; ``distortion_steps`` replaces it with
    # given steps (e.g. from benchmarks/distortion.py). "measured" beats high-rate on Whisper (3 seeds, 2 and
    # 3 bits) but costs SmolLM2 0.4-4.5 % of perplexity at 2 bits on every seed (README, Status).
    distortion: str = "high-rate"
    distortion_steps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.distortion not in DISTORTION_MODELS:
            raise RecipeError(f"unknown assign-bits distortion {self.distortion!r}",
                              f"choose one of {', '.join(DISTORTION_MODELS)}")
        if any(not step > 1.0 for step in self.distortion_steps):
            raise RecipeError(f"assign-bits distortion_steps must all be > 1, got {list(self.distortion_steps)}",
                              "give loss(b) / loss(b + 1) from 1 bit up, e.g. --set 'assign-bits.distortion_steps=[6.8,4.8,3.2]'")
        if any(b * self.vector_dim > MAX_CODE_BITS or b < 1 for b in self.widths):
            raise RecipeError(f"allowed_bits {self.widths} with d={self.vector_dim} exceed {MAX_CODE_BITS}-bit codes")
        if self.groups < 1:
            raise RecipeError(f"assign-bits groups must be positive, got {self.groups}")
        if self.uniform and (self.bits != int(self.bits) or int(self.bits) not in self.widths):
            raise RecipeError(f"uniform bit widths need a whole number of bits in {self.widths}, got {self.bits}",
                              "pass an integer --bits")

    @property
    def widths(self) -> tuple[int, ...]:
        """The bit widths a group may get: ``allowed_bits``, or those within one bit of the budget."""
        return self.allowed_bits or widths_near_budget(self.bits, MAX_CODE_BITS // self.vector_dim)


@register_pass
class AssignBits(Pass):
    name = "assign-bits"
    config_class = AssignBitsConfig
    provides = ("allocation",)

    @property
    def requires(self) -> tuple[str, ...]:
        measured = self.config.distortion == MEASURED and not self.config.distortion_steps and not self.config.uniform
        return ("stats", "distortion_curve") if measured else ("stats",)

    def _distortion_steps(self, ctx) -> tuple[float, ...]:
        cfg = self.config
        if cfg.distortion_steps or cfg.distortion != MEASURED:
            return cfg.distortion_steps or DISTORTION_MODELS[cfg.distortion]
        curve = ctx.artifacts["distortion_curve"]
        missing = sorted(set(cfg.widths) - set(curve.widths))
        if curve.vector_dim != cfg.vector_dim or missing:
            raise RecipeError(
                f"the measured distortion curve is for d={curve.vector_dim}, bits {list(curve.widths)}; "
                f"assign-bits allocates d={cfg.vector_dim}, bits {list(cfg.widths)}",
                "set both passes alike: --set '*.vector_dim=N' --set '*.allowed_bits=[...]'")
        return curve.steps

    def run(self, ctx) -> PassResult:
        cfg = self.config
        stats = ctx.artifacts["stats"]
        specs: list[GroupSpec] = []
        owners: list[tuple[str, int]] = []
        layouts = {}
        for layer in ctx.progress(ctx.layers, desc="sensitivity"):
            m, n = layer.out_features, layer.in_features
            if n % cfg.vector_dim:
                continue
            w = torch.from_numpy(weight_matrix(ctx.models[layer.graph], layer))
            layer_stats = stats[layer.key]
            h = layer_stats.input_hessian
            h_o = layer_stats.h_o if layer_stats.h_o is not None else torch.ones(m)
            scores = local_sensitivity(w, h)
            perm, bounds = channel_groups(scores, cfg.groups, cfg.vector_dim)
            if len(bounds) == 2:
                perm = torch.arange(n)  # one group: nothing to reorder, nothing stored
            layer_global = global_sensitivity(h, h_o, w, kronecker_scale(layer_stats)) if cfg.global_weighting else 1.0
            sensitivities = group_sensitivities(scores, perm, bounds, layer_global)
            layouts[layer.key] = (perm, bounds, sensitivities, layer_global)
            for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
                fixed = PERM_BITS * n if index == 0 and len(bounds) > 2 else 0
                specs.append(GroupSpec(m * (stop - start), sensitivities[index], cfg.vector_dim, fixed))
                owners.append((layer.key, index))
        if not specs:
            raise RecipeError("no layer has a width divisible by the vector dimension", "lower vector_dim")
        if cfg.uniform:
            widths = [int(cfg.bits)] * len(specs)
        else:
            widths = allocate_bits(specs, cfg.bits, cfg.widths, distortion_steps=self._distortion_steps(ctx))
        summary = summarize_allocation(specs, widths)
        allocation = {}
        for key, (perm, bounds, sensitivities, layer_global) in layouts.items():
            bits = [widths[i] for i, (k, _g) in enumerate(owners) if k == key]
            allocation[key] = LayerAllocation(perm, cfg.vector_dim, bounds, bits, sensitivities, layer_global)
        logger.info("allocated %.4f stored bits/weight (%.4f in indices) for a budget of %.4f",
                    summary.bits_per_weight, summary.index_bits_per_weight, cfg.bits)
        return PassResult({"allocation": allocation}, {"bits_per_weight": summary.bits_per_weight})
