"""Compensate (MGVQ module 2): round each layer toward the gradient-aware Newton-shifted target with
BlockLDLQ feedback, each vector taking the nearest codeword of its channel group's codebook."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mgvq_compile.algorithms.gptq import (
    block_ldlq,
    block_ldlq_two_sided,
    block_metrics_of,
    feedback_factor,
    hessian_norm,
    newton_step,
    output_matching_target,
    trust_region_target,
)
from mgvq_compile.algorithms.hessian import damp
from mgvq_compile.algorithms.kmeans import assign_in_metric, assign_nearest
from mgvq_compile.algorithms.statistics import LayerStatistics, kronecker_scale, proxy_loss
from mgvq_compile.algorithms.weighted_kmeans import alternate_codes_and_codebooks, decode_groups
from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import LinearLayer
from mgvq_compile.passes._common import quantize_in_stages
from mgvq_compile.passes.assign_bits import LayerAllocation
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.vqgemm import VQGroup, VQWeight

__all__ = ["CompensateConfig", "Compensate", "compensate_layer"]


@dataclasses.dataclass(frozen=True)
class CompensateConfig(PassConfig):
    VERSION = 13  # 11: match_float_outputs; 12: match_float_outputs_strength; 13: encoder_stage
    # How far the rounding target moves along the Newton direction -H_O^-1 G H_I^-1, as a fraction of
    # the weights' H_I-norm (a trust radius); 0 = plain second-order rounding toward W.
    # Default 0.01 (2026-11-23, 2 bits, seeds 0-2, against lam = 0): SmolLM2-135M perplexity 148.0 vs 164.2,
    # Whisper tiny.en NLL 5.27 vs 5.79, better on every seed; lam 0.05 (the method page's) hurt Whisper
    # (6.34). The Newton direction keeps only 5-16 % of its first-order gain on held-out text
    # (benchmarks/gradient.py), so only a short move pays.
    lam: float = 0.01
    damp_rel: float = 0.01
    # The relative damping d of the Newton direction (H_O + dI)^-1 G (H_I + dI)^-1; large values turn it
    # into G itself. The calibration gradient's low-curvature part is noise that the inverses amplify:
    # on held-out text the direction keeps 10-16 % of its first-order gain at 0.01 and about 50 % as G
    # (Whisper tiny.en, benchmarks/gradient.py).
    newton_damp_rel: float = 0.01
    two_sided: bool = False  # BlockLDLQ under H_O (x) H_I (a slow reference loop over rows)
    block_metric: bool = True  # nearest codeword in the metric of each block's LDL pivot, not Euclidean
    # After rounding, re-solve each (layer, group) codebook for the fixed codes under the full H_I
    # (method page, section 3); per-modality shared codebooks are never refined per layer.
    refine_codebooks: bool = True
    # Refinements, each but the last followed by re-rounding the codes with BlockLDLQ for the refined
    # codebooks (kept when it lowers the layer loss). 1 = refine once for the first codes. Seed 0, 2 bits,
    # SmolLM2 layer 11's down projection (one group): layer loss 0.864 after rounding, 0.543 refined once
    # (weight error 1.9x its norm), 0.0003 after three rounds (weight error 0.44x).
    refine_rounds: int = 3
    # Layers (in graph order) are rounded in this many stages; before each stage after the first, the
    # statistics of its layers are collected again from the model whose earlier stages hold their
    # quantized weights (as GPTQ quantizes block by block on quantized inputs), so each layer sees, and its
    # gradient step corrects, the error upstream. 1 = every layer from the float model's statistics (the
    # method page). Each extra stage costs one more calibration pass, so it is off by default. Whisper
    # tiny.en, 2 bits, 8 stages (--tag seq8): NLL 4.30 and 4.01 against 5.27 and 5.18 (seeds 0, 1), but
    # WER 1.35 and 1.98 against 1.26 and 1.24 (longer greedy loops); with 128 sentences (--tag
    # seq8-calib128, seeds 0-2) NLL 3.83 +- 0.32 against 4.85 +- 0.35 (every seed), WER 1.52 against 1.20,
    # compile 786 s against 458 s.
    # SmolLM2-135M, 8 stages, seed 0 (--tag seq8): perplexity 164.7 against 154.9, worse.
    sequential_stages: int = 1
    # The modality encoder (the non-text layers before the first text layer in graph order: Whisper's audio
    # encoder, a VLM's vision tower and projector) is a stage of its own, so the language side is rounded
    # on statistics (inputs and gradients) collected again with the encoder quantized. One more
    # calibration pass on a multimodal model; nothing on a text-only one. Whisper tiny.en alone: encoder
    # NLL 1.67, decoder 2.09, both 3.01 (float 1.27; benchmarks/layer_subsets.py): their errors compound.
    # mgvq, 2 bits, seeds 0-2 (--tag encstage): NLL 2.73 +- 0.34 against 2.99 +- 0.28 (every seed), WER
    # 0.92 +- 0.17 against 1.41 +- 0.25, compile 150 s against 46 s from cached float statistics.
    encoder_stage: bool = True
    # In the stages after the first, round toward W C H^-1 instead of W: the weights that map the layer's
    # inputs in the partly quantized model to the float model's outputs, with C = sum_t w_t x^f_t x_t^T the
    # cross moment of its float and quantized inputs (GPTAQ's asymmetric calibration; one more forward of
    # the float model per sample and stage). Without it, each layer reproduces W x_t, so the error
    # upstream is only seen by the rounding, never undone. Whisper tiny.en, 2 bits, 8 stages, 32 sentences,
    # seed 0 (--tag seq8-match): NLL 7.11 against 4.30 without it; the full map moves the decoder's
    # weights by a median 0.56 of their H-norm (report: output_matching_shift_relative_norm), fitted to
    # noise in C - H. So it is off.
    match_float_outputs: bool = False
    # The fraction a of that move: round toward W + a W (C - H) H^-1 (1 = the least-squares map). At 0.25
    # the same Whisper run gives NLL 4.93, still worse than without matching (--tag seq8-match0.25).
    match_float_outputs_strength: float = 1.0

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise RecipeError(f"compensate lam must be >= 0, got {self.lam}")
        if self.newton_damp_rel <= 0:
            raise RecipeError(f"compensate newton_damp_rel must be > 0, got {self.newton_damp_rel}",
                              "pass a relative damping such as 0.01 (large values move along G itself)")
        if self.sequential_stages < 1:
            raise RecipeError(f"compensate sequential_stages must be >= 1, got {self.sequential_stages}",
                              "1 = every layer from the float model's statistics")
        if self.match_float_outputs and self.sequential_stages < 2:
            raise RecipeError("compensate match_float_outputs needs sequential_stages >= 2 (with one stage every "
                              "layer's inputs are the float model's)", "set compensate.sequential_stages=4, say")
        if not 0.0 <= self.match_float_outputs_strength <= 1.0:
            raise RecipeError(f"compensate match_float_outputs_strength must be in [0, 1], got "
                              f"{self.match_float_outputs_strength}", "1 = the least-squares map, 0 = none of it")
        if self.refine_rounds < 1:
            raise RecipeError(f"compensate refine_rounds must be >= 1, got {self.refine_rounds}",
                              "set compensate.refine_codebooks=false to skip refinement")


def _nearest_codewords(w: torch.Tensor, books: list[torch.Tensor], block_group: np.ndarray, d: int) -> torch.Tensor:
    """W rounded vector by vector to its group's nearest codeword, without error feedback."""
    out = torch.empty_like(w, dtype=torch.float32)
    for group in np.unique(block_group):
        blocks = np.flatnonzero(block_group == group)
        cols = slice(int(blocks[0]) * d, (int(blocks[-1]) + 1) * d)
        vectors = w[:, cols].reshape(-1, d).to(torch.float32)
        out[:, cols] = books[group][assign_nearest(vectors, books[group])].reshape(w.shape[0], -1)
    return out


def compensate_layer(weight: np.ndarray, plan: LayerAllocation, books: list[np.ndarray], layer_stats: LayerStatistics,
                     cfg: CompensateConfig, scope: str = "layer-group") -> tuple[VQWeight, dict]:
    """One layer (float32 m x n) rounded with BlockLDLQ feedback to its groups' codebooks (and the codebooks
    refined, for per-layer scope); returns the quantized layer and its report metrics."""
    d = plan.vector_dim
    m, n = weight.shape
    h = layer_stats.input_hessian
    w = torch.from_numpy(weight).to(torch.float64)
    extra: dict = {"codebook_scope": scope}
    cross = layer_stats.input_cross_moment
    if cross is not None:
        matched = output_matching_target(w, cross, h, damp_rel=cfg.damp_rel, strength=cfg.match_float_outputs_strength)
        extra["output_matching_shift_relative_norm"] = hessian_norm(matched - w, h) / max(hessian_norm(w, h), 1e-30)
        w = matched
    if cfg.lam > 0 and layer_stats.gradient is not None:
        step = newton_step(layer_stats.gradient, h, layer_stats.h_o, damp_rel=cfg.newton_damp_rel)
        # The full Newton step F^-1 vec(G), F ~ s (H_O kron H_I), relative to W: how far the raw
        # formula would move the weights (reported, so the trust radius can be judged).
        extra["newton_step_relative_norm"] = (
            hessian_norm(step, h) / kronecker_scale(layer_stats) / max(hessian_norm(w, h), 1e-30))
        w = trust_region_target(w, step, h, radius=cfg.lam)
    perm = plan.perm
    block_group = np.repeat(np.arange(len(plan.bits)), np.diff(plan.bounds) // d)
    centroid_sets = [torch.from_numpy(b.astype(np.float32)) for b in books]
    h_perm = h[perm][:, perm]
    h_damped = damp(h_perm, cfg.damp_rel)[0]
    feedback, d_blocks = feedback_factor(h_damped, d)  # one factorisation for every rounding below
    block_metrics = block_metrics_of(d_blocks, d) if cfg.block_metric else None
    spans = list(zip(plan.bounds, plan.bounds[1:]))
    original = torch.from_numpy(weight)[:, perm]
    h_x_perm = layer_stats.h_x[perm][:, perm]  # the report's proxy metric
    target = w[:, perm]

    def round_codes(books_now: list[torch.Tensor]) -> list[torch.Tensor]:
        def assign(targets: torch.Tensor, block: int) -> torch.Tensor:
            book = books_now[block_group[block]]
            if block_metrics is None:
                chosen = assign_nearest(targets.to(torch.float32), book)
            else:
                chosen = assign_in_metric(targets.to(torch.float32), book, block_metrics[block])
            return book[chosen].to(targets.dtype)

        if cfg.two_sided and layer_stats.h_o is not None and layer_stats.h_o.dim() == 2:
            q = block_ldlq_two_sided(target, h_perm, layer_stats.h_o, assign, d=d, damp_rel=cfg.damp_rel)
        else:
            q = block_ldlq(target, h_perm, assign, d=d, feedback=feedback)
        # Q holds codewords exactly, so the nearest codeword of each vector of Q is its code.
        return [assign_nearest(q[:, start:stop].reshape(-1, d).to(torch.float32), books_now[index]).reshape(m, -1)
                for index, (start, stop) in enumerate(spans)]

    before = _nearest_codewords(original, centroid_sets, block_group, d)
    codes = round_codes(centroid_sets)
    if cfg.refine_codebooks and scope == "layer-group":
        extra["proxy_loss_before_refinement"] = proxy_loss(original, decode_groups(codes, centroid_sets, m), h_x_perm)
        codes, centroid_sets, losses = alternate_codes_and_codebooks(
            target, codes, centroid_sets, plan.bounds, h_damped, d, round_codes, rounds=cfg.refine_rounds)
        extra["refinement_steps"] = len(losses) - 1
        books = [book.numpy().astype(np.float16) for book in centroid_sets]
    groups = [VQGroup(start, stop, bits, books[index], codes[index].numpy())
              for index, ((start, stop), bits) in enumerate(zip(spans, plan.bits))]
    identity = bool(torch.equal(perm, torch.arange(n)))
    result = VQWeight(m, n, d, tuple(groups), None if identity else perm.numpy().astype(np.int32))
    extra["proxy_loss_before_compensation"] = proxy_loss(original, before, h_x_perm)
    return result, extra


@register_pass
class Compensate(Pass):
    name = "compensate"
    config_class = CompensateConfig
    requires = ("stats", "allocation", "codebooks")
    provides = ("quantized", "quant_metrics")

    def run(self, ctx) -> PassResult:
        cfg = self.config
        stats, allocation, codebooks = (ctx.artifacts[k] for k in ("stats", "allocation", "codebooks"))
        scope = ctx.artifacts.get("codebook_scope", "layer-group")

        def quantize_on(stats: dict):
            def quantize(weight: np.ndarray, layer: LinearLayer) -> tuple[VQWeight, dict] | None:
                if layer.key not in allocation:
                    return None
                return compensate_layer(weight, allocation[layer.key], codebooks[layer.key], stats[layer.key], cfg, scope)
            return quantize

        quantized, metrics = quantize_in_stages(ctx, f"compensate (lam={cfg.lam})", quantize_on, stats,
                                                encoder_stage=cfg.encoder_stage, stages=cfg.sequential_stages,
                                                match_float_outputs=cfg.match_float_outputs)
        return PassResult({"quantized": quantized, "quant_metrics": metrics}, {"layers": len(quantized)})
