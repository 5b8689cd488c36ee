"""AssignBits (MGVQ module 1): rank input channels by sensitivity, cut each layer into channel groups,
and allocate bit widths to all groups of the model under one budget that counts everything stored."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from fractions import Fraction

import torch

from mgvq_compile.algorithms.allocation import (
    COMPENSATED_STEPS,
    GroupSpec,
    allocate_bits,
    as_width,
    code_bits,
    summarize_allocation,
    widths_near_budget,
)
from mgvq_compile.algorithms.sensitivity import channel_groups, global_sensitivity, group_sensitivities, local_sensitivity
from mgvq_compile.algorithms.statistics import kronecker_scale
from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import attention_query_key_layers, weight_matrix
from mgvq_compile.passes._common import MAX_CODE_BITS, vector_dim_for_budget
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass

__all__ = ["AssignBitsConfig", "AssignBits", "LayerAllocation"]

logger = logging.getLogger(__name__)

PERM_BITS = 32  # the column permutation is stored as int32
# Weight names of attention query and key projections (Hugging Face naming: q_proj / k_proj, query / key);
# the floor also finds them by graph structure (graph.attention_query_key_layers), for anonymous names.
QUERY_KEY_PATTERN = re.compile(r"(^|[./_])(q_proj|k_proj|query|key)([./_]|$)")
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
    bits: list[int | float]  # per weight; a multiple of 1 / vector_dim (whole code bits per vector)
    sensitivity: list[float]  # S_g per channel group, the allocation's loss weights
    global_sensitivity: float


def groups_for_vector_dim(d: int) -> int:
    """The default channel groups per layer at vector dimension ``d``: 1 at d >= 4, whose codebooks are 16x
    (and more) those of d = 2 at the same bits, else 4 (the method page's G)."""
    return 1 if d >= 4 else 4


@dataclasses.dataclass(frozen=True)
class AssignBitsConfig(PassConfig):
    # 15: groups follow d (4 at d <= 2, 1 at d = 4); 14: defaults d by budget, one group, fractional
    # widths, global exponent 0.5; 13: global_exponent;
    # 12: fractional widths; 11: query/key projections also found by structure; 10: min_bits,
    # query_key_floor; 9: allowed widths near the budget by default; 8: the distortion model
    VERSION = 15
    bits: float = 2.0  # model-wide budget in stored bits per quantized weight
    # Channel groups per layer; 0 = follow the vector dimension (groups_for_vector_dim): one at d = 4,
    # where each group would store a 256- to 4096-codeword codebook (the layout of the d = 4 measurements
    # below), four at d <= 2 as on the method page. SmolLM2 at 3 bits (d = 2, seed 0): perplexity 63.2
    # with four groups against 73.0 with one.
    groups: int = 0
    # 0 = follow the budget (vector_dim_for_budget: 4 at 2 bits as on the method page, 2 at 3-4 bits).
    # At gptvq's stored bits (2 bits, 3 seeds), d = 4 with one group and fractional widths beats d = 2 with
    # four groups and whole widths on every seed of both models (Whisper NLL 1.45, 1.57, 1.72 against 1.83,
    # 2.56, 2.95; SmolLM2 perplexity 136.0, 120.4, 115.5 against 146.8, 150.9, 135.6; README, Status). At
    # 3 bits d = 4 codes are 12 bits wide, and gptvq's 4096-codeword codebooks stored 4.0 bits per weight.
    vector_dim: int = 0
    # () = the widths within one bit of the budget ((1, 2, 3) at 2 bits whole, (2, 3, 4) at 3), not the
    # method page's {1, 2, 3, 4}: 3 seeds each, SmolLM2 perplexity 164 vs 169 (2 bits) and 67.1 vs 68.4
    # (3 bits), Whisper NLL 5.79 vs 5.95 and 1.54 vs 1.93 (benchmarks/results/accuracy-bits{123,234}.md).
    allowed_bits: tuple[float, ...] = ()
    # True: the default widths step by 1/d bits per weight (every whole code width b*d of a vector), not by
    # whole bits: at d = 4 and a 2-bit budget, 1, 1.25, ..., 3 instead of 1, 2, 3. Whole bits at d = 4 move
    # a group by 4 code bits at once (16x its codebook), so paying a 2.000 budget's codebooks sends whole
    # layers to 1 bit; a fraction of a bit pays them with a few groups one code bit narrower.
    fractional_widths: bool = True
    # The "no allocation" ablation: every group gets ``bits`` index bits per weight (a whole number), with
    # codebooks and permutation stored on top, as in gptvq; with groups = 1 no permutation is stored.
    uniform: bool = False
    # False: every layer's global sensitivity is 1, so layers compete by their local (H-weighted) error
    # alone; the ablation of the gradient-based global term.
    global_weighting: bool = True
    # The global term enters the allocation raised to this power: 1 as the method page has it, 0 as
    # global_weighting=false, between them a tempered term whose spread across layers is narrower. On
    # SmolLM2 the term spans 100x between v_proj and gate_proj per weight, but the end loss does not:
    # swapping the allocated layers of one type into a uniform d = 4 compile (benchmarks/layer_subsets.py
    # --base) moved ln(perplexity) by -0.064 for v_proj and +0.136 for gate+up_proj, where exponent 1
    # predicted a net gain for the MLP and for the whole model, both measured as losses. 0.5 (d = 4, one
    # group, fractional widths, gptvq's bits, 3 seeds): SmolLM2 perplexity 115.6, 107.8, 108.8 against
    # 136.0, 120.4, 115.5 at 1; Whisper NLL 1.35, 1.43, 1.73 against 1.45, 1.57, 1.72.
    global_exponent: float = 0.5
    # The loss model D(b) of each width, a name in DISTORTION_MODELS; ``distortion_steps`` replaces it with
    # given steps (e.g. from benchmarks/distortion.py). "measured" beats high-rate on Whisper (3 seeds, 2 and
    # 3 bits) but costs SmolLM2 0.4-4.5 % of perplexity at 2 bits on every seed (README, Status).
    distortion: str = "high-rate"
    distortion_steps: tuple[float, ...] = ()
    # Floors on the widths of chosen layers, each "REGEX=BITS": every channel group of a layer whose weight
    # name matches REGEX (re.search) gets at least BITS bits; the first matching rule counts.
    min_bits: tuple[str, ...] = ()
    # Attention query and key projections (the layers feeding an attention's Q K^T product, found in the
    # graph, or named as in QUERY_KEY_PATTERN) get at least the budget's whole bits, as in
    # the uniform methods. Their errors multiply in the attention logits, which the per-layer loss model
    # cannot see: Whisper tiny.en, mgvq 2 bits, seed 1, with the decoded weights of only some layers in
    # the float model (benchmarks/layer_subsets.py): cross-attention queries alone NLL 1.40, keys alone
    # 1.35, both 2.02 (float 1.27); the allocation had given them 1.1-2.1 bits. With the floor (--tag
    # qkfloor, 2 bits, seeds 0-2): Whisper NLL 2.99 +- 0.28 against 4.85 +- 0.35 (every seed), SmolLM2
    # perplexity 151.9 against 148.0, inside the seed spread (+-10).
    query_key_floor: bool = True

    def __post_init__(self) -> None:
        if self.distortion not in DISTORTION_MODELS:
            raise RecipeError(f"unknown assign-bits distortion {self.distortion!r}",
                              f"choose one of {', '.join(DISTORTION_MODELS)}")
        if any(not step > 1.0 for step in self.distortion_steps):
            raise RecipeError(f"assign-bits distortion_steps must all be > 1, got {list(self.distortion_steps)}",
                              "give loss(b) / loss(b + 1) from 1 bit up, e.g. --set 'assign-bits.distortion_steps=[6.8,4.8,3.2]'")
        if self.vector_dim < 0:
            raise RecipeError(f"assign-bits vector_dim must be positive, or 0 to follow the budget, got {self.vector_dim}")
        if any(b * self.dim > MAX_CODE_BITS or b < 1 for b in self.widths):
            raise RecipeError(f"allowed_bits {self.widths} with d={self.dim} exceed {MAX_CODE_BITS}-bit codes")
        for b in self.widths:
            code_bits(b, self.dim)  # raises unless b * d is whole
        if self.distortion == MEASURED and not self.distortion_steps and any(not float(b).is_integer() for b in self.widths):
            raise RecipeError(f"assign-bits distortion 'measured' takes whole widths, got {list(self.widths)}",
                              "add --set assign-bits.fractional_widths=false (whole widths) for the measured "
                              "model, or use distortion 'high-rate' or 'compensated'")
        if not 0.0 <= self.global_exponent <= 1.0:
            raise RecipeError(f"assign-bits global_exponent must be in [0, 1], got {self.global_exponent}",
                              "1 weighs layers by the global term as it is, 0 ignores it")
        if self.groups < 0:
            raise RecipeError(f"assign-bits groups must be positive, or 0 to follow the vector dimension, got {self.groups}")
        if self.uniform and (self.bits != int(self.bits) or int(self.bits) not in self.widths):
            raise RecipeError(f"uniform bit widths need a whole number of bits in {self.widths}, got {self.bits}",
                              "pass an integer --bits")
        self.min_bits_rules  # noqa: B018 (parses and checks the rules)
        if self.min_bits and self.uniform:
            raise RecipeError("assign-bits min_bits has no effect with uniform widths",
                              "drop min_bits, or allocate (uniform=false)")

    @functools.cached_property
    def min_bits_rules(self) -> list[tuple[re.Pattern, int | float]]:
        rules = []
        for rule in self.min_bits:
            pattern, sep, bits = rule.rpartition("=")
            try:
                rules.append((re.compile(pattern), as_width(float(bits))))
            except (re.error, ValueError) as exc:
                raise RecipeError(f"assign-bits min_bits rule {rule!r} is not REGEX=BITS ({exc})",
                                  "write e.g. --set 'assign-bits.min_bits=[\"(q|k)_proj=2\"]'") from exc
            if not sep or not pattern:
                raise RecipeError(f"assign-bits min_bits rule {rule!r} is not REGEX=BITS",
                                  "write e.g. --set 'assign-bits.min_bits=[\"(q|k)_proj=2\"]'")
            if as_width(float(bits)) not in self.widths:
                raise RecipeError(f"assign-bits min_bits rule {rule!r} asks for {bits} bits, not an allowed width "
                                  f"{list(self.widths)}", "pick an allowed width, or set assign-bits.allowed_bits")
        return rules

    def min_bits_of(self, layer_name: str) -> int | float:
        """The floor on ``layer_name``'s widths: the first matching rule's bits, or 0."""
        return next((bits for pattern, bits in self.min_bits_rules if pattern.search(layer_name)), 0)

    @property
    def query_key_bits(self) -> int | float:
        """The floor on query and key projections: the narrowest allowed width >= the budget's whole
        bits (0 when off, uniform, or none is allowed)."""
        if not self.query_key_floor or self.uniform:
            return 0
        return min((b for b in self.widths if b >= int(self.bits)), default=0)

    @property
    def dim(self) -> int:
        """The vector dimension: ``vector_dim``, or the budget's (``vector_dim_for_budget``) when it is 0."""
        return self.vector_dim or vector_dim_for_budget(self.bits)

    @property
    def group_count(self) -> int:
        """Channel groups per layer: ``groups``, or the vector dimension's (``groups_for_vector_dim``) when 0."""
        return self.groups or groups_for_vector_dim(self.dim)

    @property
    def global_power(self) -> float:
        """The power of the global term in the allocation; 0 (no global term) without global_weighting."""
        return self.global_exponent if self.global_weighting else 0.0

    @property
    def widths(self) -> tuple[int | float, ...]:
        """The bit widths a group may get: ``allowed_bits``, or those within one bit of the budget (in
        steps of 1/d with ``fractional_widths``)."""
        if self.allowed_bits:
            return tuple(as_width(b) for b in self.allowed_bits)
        step = Fraction(1, self.dim) if self.fractional_widths else Fraction(1)
        return widths_near_budget(self.bits, Fraction(MAX_CODE_BITS, self.dim), step)


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
        if curve.vector_dim != cfg.dim or missing:
            raise RecipeError(
                f"the measured distortion curve is for d={curve.vector_dim}, bits {list(curve.widths)}; "
                f"assign-bits allocates d={cfg.dim}, bits {list(cfg.widths)}",
                "set both passes alike: --set '*.vector_dim=N' --set '*.allowed_bits=[...]'")
        return curve.steps

    def run(self, ctx) -> PassResult:
        cfg = self.config
        stats = ctx.artifacts["stats"]
        specs: list[GroupSpec] = []
        owners: list[tuple[str, int]] = []
        layouts = {}
        matched = set()
        query_key_layers = 0
        structural_query_keys = set()
        if cfg.query_key_bits:
            for graph_name, model in ctx.models.items():
                graph_layers = [layer for layer in ctx.layers if layer.graph == graph_name]
                structural_query_keys |= attention_query_key_layers(model, graph_layers)
        for layer in ctx.progress(ctx.layers, desc="sensitivity"):
            m, n = layer.out_features, layer.in_features
            if n % cfg.dim:
                continue
            w = torch.from_numpy(weight_matrix(ctx.models[layer.graph], layer))
            layer_stats = stats[layer.key]
            h = layer_stats.input_hessian
            h_o = layer_stats.h_o if layer_stats.h_o is not None else torch.ones(m)
            scores = local_sensitivity(w, h)
            perm, bounds = channel_groups(scores, cfg.group_count, cfg.dim)
            if len(bounds) == 2:
                perm = torch.arange(n)  # one group: nothing to reorder, nothing stored
            layer_global = (global_sensitivity(h, h_o, w, kronecker_scale(layer_stats)) ** cfg.global_power
                            if cfg.global_power else 1.0)
            sensitivities = group_sensitivities(scores, perm, bounds, layer_global)
            layouts[layer.key] = (perm, bounds, sensitivities, layer_global)
            floor = cfg.min_bits_of(layer.weight)
            if floor:
                matched.add(layer.weight)
            if cfg.query_key_bits and (layer.key in structural_query_keys or QUERY_KEY_PATTERN.search(layer.weight)):
                floor = max(floor, cfg.query_key_bits)
                query_key_layers += 1
            for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
                fixed = PERM_BITS * n if index == 0 and len(bounds) > 2 else 0
                specs.append(GroupSpec(m * (stop - start), sensitivities[index], cfg.dim, fixed, min_bits=floor))
                owners.append((layer.key, index))
        if not specs:
            raise RecipeError("no layer has a width divisible by the vector dimension", "lower vector_dim")
        if cfg.min_bits and not matched:
            raise RecipeError(f"no layer name matches assign-bits min_bits {list(cfg.min_bits)}",
                              f"layer names look like {ctx.layers[0].weight!r}")
        if matched or query_key_layers:
            logger.info("width floors: %d layers by min_bits, %d query/key projections at >= %d bits",
                        len(matched), query_key_layers, cfg.query_key_bits)
        if cfg.uniform:
            widths = [int(cfg.bits)] * len(specs)
        else:
            widths = allocate_bits(specs, cfg.bits, cfg.widths, distortion_steps=self._distortion_steps(ctx))
        summary = summarize_allocation(specs, widths)
        allocation = {}
        for key, (perm, bounds, sensitivities, layer_global) in layouts.items():
            bits = [widths[i] for i, (k, _g) in enumerate(owners) if k == key]
            allocation[key] = LayerAllocation(perm, cfg.dim, bounds, bits, sensitivities, layer_global)
        logger.info("allocated %.4f stored bits/weight (%.4f in indices) for a budget of %.4f",
                    summary.bits_per_weight, summary.index_bits_per_weight, cfg.bits)
        return PassResult({"allocation": allocation}, {"bits_per_weight": summary.bits_per_weight})
