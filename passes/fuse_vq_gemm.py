"""FuseVQGemm: replace each quantized MatMul/Gemm weight by its VQ-GEMM form.

``form="custom"`` (the default) emits ``mgvq.VQGemm`` nodes, run by the kernels of custom_ops/ (open
sessions with ``mgvq_compile.runtime.create_session``). ``form="decomposed"`` (CLI ``--portable``)
rebuilds each weight with standard ONNX ops, which stock ORT runs (and folds into a dense weight at
load). A layer the kernels cannot take (weights other than float32/float16, a Gemm bias that is not
one value per output) keeps the decomposed form in a custom-form model, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import opset_of
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.vqgemm import CUSTOM_DOMAIN, emit_custom_node, emit_decomposed_weight

__all__ = ["FORMS", "FuseVQGemmConfig", "FuseVQGemm", "custom_form_obstacle"]

logger = logging.getLogger(__name__)

FORMS = ("custom", "decomposed")
KERNEL_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)  # activation types the VQGemm kernels take


@dataclasses.dataclass(frozen=True)
class FuseVQGemmConfig(PassConfig):
    VERSION = 1
    form: str = "custom"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise RecipeError(f"fuse-vq-gemm form must be one of {FORMS}, got {self.form!r}")


def _gemm_bias(node: ir.Node) -> ir.Value | None:
    if node.op_type == "Gemm" and len(node.inputs) > 2:
        return node.inputs[2]
    return None


def custom_form_obstacle(node: ir.Node, out_features: int, weight_dtype: ir.DataType | None) -> str | None:
    """Why a MatMul/Gemm cannot become a ``mgvq.VQGemm`` node, or None when it can."""
    if weight_dtype not in KERNEL_DTYPES:
        return f"its weights are {weight_dtype} (the VQGemm kernels take float32 or float16)"
    bias = _gemm_bias(node)
    shape = None if bias is None or bias.shape is None else tuple(bias.shape)
    if bias is not None and shape != (out_features,):
        return f"its Gemm bias has shape {shape or 'unknown'}, not ({out_features},)"
    return None


@register_pass
class FuseVQGemm(Pass):
    name = "fuse-vq-gemm"
    config_class = FuseVQGemmConfig
    requires = ("quantized",)
    provides = ("stored",)
    rewrites_graph = True

    def run(self, ctx) -> PassResult:
        quantized = ctx.artifacts["quantized"]
        stored: dict[str, dict[str, str]] = {}
        custom_graphs: set[str] = set()
        decomposed = 0
        for layer in ctx.progress(ctx.layers, desc=f"fusing ({self.config.form})"):
            if layer.key not in quantized:
                continue
            model = ctx.models[layer.graph]
            graph = model.graph
            weight_value = graph.initializers[layer.weight]
            (node, _index), = weight_value.uses()
            prefix = f"{layer.weight}.vq"
            if self._layer_form(node, layer, weight_value) == "custom":
                arrays = self._emit_custom(model, node, layer, prefix, quantized[layer.key])
                custom_graphs.add(layer.graph)
            else:
                arrays = self._emit_decomposed(model, node, layer, prefix, quantized[layer.key], weight_value)
                decomposed += 1
            del graph.initializers[layer.weight]
            stored[layer.key] = {role: value.name for role, value in arrays.items()}
        for name in custom_graphs:
            ctx.models[name].opset_imports.setdefault(CUSTOM_DOMAIN, 1)
        return PassResult(
            {"stored": stored},
            {"layers": len(stored), "form": self.config.form, "custom_layers": len(stored) - decomposed,
             "decomposed_layers": decomposed},
        )

    def _layer_form(self, node: ir.Node, layer, weight_value: ir.Value) -> str:
        if self.config.form == "decomposed":
            return "decomposed"
        obstacle = custom_form_obstacle(node, layer.out_features, weight_value.dtype)
        if obstacle is None:
            return "custom"
        logger.warning("%s stays in the decomposed form (standard ONNX ops): %s", layer.weight, obstacle)
        return "decomposed"

    @staticmethod
    def _emit_decomposed(model, node, layer, prefix, weight, weight_value):
        graph = model.graph
        dense, arrays = emit_decomposed_weight(
            graph, node, prefix, weight, opset_of(model), transpose=not layer.weight_is_transposed,
        )
        if weight_value.dtype != ir.DataType.FLOAT:
            cast = ir.node("Cast", [dense], {"to": weight_value.dtype}, name=f"{prefix}/cast")
            cast.outputs[0].name = f"{prefix}/cast_out"
            graph.insert_before(node, cast)
            dense = cast.outputs[0]
        node.replace_input_with(1, dense)
        return arrays

    @staticmethod
    def _emit_custom(model, node, layer, prefix, weight):
        graph = model.graph
        bias = _gemm_bias(node)  # checked by custom_form_obstacle
        old_output = node.outputs[0]
        new_output = ir.Value(name=f"{prefix}/out", shape=old_output.shape, type=old_output.type)
        _new_node, arrays = emit_custom_node(graph, node, prefix, weight, node.inputs[0], bias, new_output)
        name = old_output.name
        # find_linear_layers never picks a node whose output is a graph output, so only uses move.
        old_output.replace_all_uses_with(new_output)
        graph.remove(node, safe=True)
        new_output.name = name
        return arrays
