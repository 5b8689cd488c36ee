"""CollectStats: one forward (+ backward) pass of the calibration set through the graph, in torch.

Per quantizable weight it accumulates H_X (and H_X per token modality), and when gradients are on,
the weight gradient G and the Kronecker factors H_I, H_O (method page, section 1).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from mgvq_compile.algorithms.statistics import LayerStatistics, accumulate, new_statistics

from mgvq_compile.calibration.feeds import LABELS_KEY, TOKEN_MODALITY_KEY
from mgvq_compile.errors import CalibrationError, RecipeError
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass

__all__ = ["CollectStatsConfig", "CollectStats", "TOKEN_MODALITY_KEY", "LABELS_KEY"]

logger = logging.getLogger(__name__)





@dataclasses.dataclass(frozen=True)
class CollectStatsConfig(PassConfig):
    VERSION = 3  # 3: provides stats_config
    gradients: bool = True
    # False: every token weighs 1 in H_I (H_I = H_X / T), the ablation of the importance weighting;
    # G, H_O and the Fisher trace keep the gradients.
    token_importance: bool = True
    max_samples: int = 128
    full_output_hessian_limit: int = 4096  # wider layers keep only the diagonal of H_O

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise RecipeError(f"collect-stats max_samples must be positive, got {self.max_samples}")


def _split_feed(feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]:
    inputs = {k: v for k, v in feed.items() if k not in (LABELS_KEY, TOKEN_MODALITY_KEY)}
    return inputs, feed.get(LABELS_KEY), feed.get(TOKEN_MODALITY_KEY)


@register_pass
class CollectStats(Pass):
    name = "collect-stats"
    config_class = CollectStatsConfig
    provides = ("stats", "stats_config")
    needs_calibration = True

    def run(self, ctx) -> PassResult:
        if not ctx.calibration:
            raise CalibrationError(
                "collect-stats needs calibration data and none was given",
                "pass --calib DIR (a directory of .npz feeds), or use a method that needs none (rtn, kmeans-vq)",
            )
        samples = ctx.calibration[: self.config.max_samples]
        if self.config.gradients and ctx.options.labels == "data" and any(LABELS_KEY not in s for s in samples):
            raise CalibrationError(
                "this recipe collects gradients, which need labels, but the calibration files have no 'labels' array",
                "add int64 'labels' (-100 = ignore) to each .npz, or pass --labels model to use the model's own "
                "argmax as pseudo-labels",
            )
        stats = self.collect(ctx, ctx.models, ctx.layers)
        # The config travels with the statistics, so a later pass can collect more of the same kind.
        return PassResult({"stats": stats, "stats_config": self.config}, {"samples": len(samples), "layers": len(stats)})

    def collect(self, ctx, models: dict, layers: list, reference_models: dict | None = None) -> dict[str, LayerStatistics]:
        """Statistics of ``layers`` over the calibration set, running ``models`` (graph name -> model: the
        compile's own, or copies holding other weights). With ``reference_models`` (graph name -> model),
        each sample also runs there and the layers' inputs in it give the cross moment C."""
        samples = ctx.calibration[: self.config.max_samples]
        stats: dict[str, LayerStatistics] = {}
        for graph_name, model in models.items():
            in_graph = [layer for layer in layers if layer.graph == graph_name]
            if in_graph:
                reference = None if reference_models is None else reference_models[graph_name]
                stats.update(self._collect_graph(ctx, graph_name, model, in_graph, samples, self.config.gradients,
                                                 reference))
        return stats

    def _collect_graph(self, ctx, graph_name, model, layers, samples, gradients, reference_model=None):
        from mgvq_compile.calibration.executor import GraphExecutor

        executor = GraphExecutor(
            model, device=ctx.options.device, trainable=[layer.weight for layer in layers] if gradients else ()
        )
        reference = (None if reference_model is None
                     else GraphExecutor(reference_model, device=ctx.options.device, trainable=()))
        outputs_of = {}
        for node in model.graph:
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                outputs_of.setdefault(node.inputs[1].name, node.outputs[0].name)
        inputs = {layer.activation for layer in layers}
        keep = set(inputs)
        if gradients:
            keep |= {outputs_of[layer.weight] for layer in layers}
        stats = {
            layer.key: new_statistics(
                layer.in_features, layer.out_features, gradients=gradients,
                full_output_hessian=layer.out_features <= self.config.full_output_hessian_limit,
            )
            for layer in layers
        }
        for sample in ctx.progress(samples, desc=f"calibrating {graph_name}"):
            feeds, labels, token_modality = _split_feed(sample)
            reference_values = {}
            if reference is not None:
                with torch.no_grad():
                    reference_values = reference.run(feeds, keep=inputs)
            with torch.set_grad_enabled(gradients):
                values = executor.run(feeds, keep=keep)
                if gradients:
                    self._backward(ctx, values, labels)
            for layer in layers:
                x = values[layer.activation].detach()
                x = x.reshape(-1, x.shape[-1])
                g = None
                if gradients:
                    y = values[outputs_of[layer.weight]]
                    if y.grad is None:
                        raise CalibrationError(f"no gradient reached layer {layer.key} from the loss")
                    g = y.grad.reshape(-1, y.shape[-1])
                x_reference = None
                if reference is not None:
                    x_reference = reference_values[layer.activation].detach()
                    x_reference = x_reference.reshape(-1, x_reference.shape[-1])
                accumulate(stats[layer.key], x, g, self._token_masks(ctx, layer, token_modality, x.shape[0]),
                           token_importance=self.config.token_importance, x_reference=x_reference)
            executor.zero_grad()
        return stats

    @staticmethod
    def _token_masks(ctx, layer, token_modality, tokens):
        own = ctx.modalities.get(layer.key, "other")
        if token_modality is not None and own == "text" and token_modality.size == tokens:
            mask = torch.from_numpy(token_modality.reshape(-1).astype(bool))
            return {"text": ~mask, "vision": mask}
        return {own: torch.ones(tokens, dtype=torch.bool)}

    @staticmethod
    def _backward(ctx, values, labels):
        name = ctx.options.logits_name
        if name not in values:
            raise CalibrationError(
                f"the graph has no output named {name!r} for the calibration loss",
                f"pass --logits NAME with one of the graph outputs: {', '.join(sorted(values))}",
            )
        logits = values[name].float()
        if ctx.options.labels == "model":
            targets = logits.detach().argmax(dim=-1)
        else:
            targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
            if tuple(targets.shape) != tuple(logits.shape[:-1]):
                raise CalibrationError(
                    f"labels have shape {tuple(targets.shape)} but logits {name!r} have {tuple(logits.shape)}",
                    "labels must have the logits' shape without the last (vocabulary) axis; -100 = ignore",
                )
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
            ignore_index=-100, reduction="sum",
        )
        loss.backward()
