"""FuseVQGemm: replace each quantized MatMul/Gemm weight by its VQ-GEMM form.

``form="custom"`` emits a ``mgvq.VQGemm`` node (needs the kernels of custom_ops/ at run time);
``form="decomposed"`` rebuilds the weight with standard ONNX ops, which stock ORT runs.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import opset_of
from mgvq_compile.pipeline.base import Pass, PassConfig, PassResult, register_pass
from mgvq_compile.vqgemm import CUSTOM_DOMAIN, emit_custom_node, emit_decomposed_weight

__all__ = ["FuseVQGemmConfig", "FuseVQGemm"]

logger = logging.getLogger(__name__)

FORMS = ("decomposed", "custom")


@dataclasses.dataclass(frozen=True)
class FuseVQGemmConfig(PassConfig):
    VERSION = 1
    form: str = "decomposed"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise RecipeError(f"fuse-vq-gemm form must be one of {FORMS}, got {self.form!r}")


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
        for layer in ctx.progress(ctx.layers, desc=f"fusing ({self.config.form})"):
            if layer.key not in quantized:
                continue
            model = ctx.models[layer.graph]
            graph = model.graph
            weight_value = graph.initializers[layer.weight]
            (node, _index), = weight_value.uses()
            prefix = f"{layer.weight}.vq"
            if self.config.form == "decomposed":
                dense, arrays = emit_decomposed_weight(
                    graph, node, prefix, quantized[layer.key], opset_of(model),
                    transpose=not layer.weight_is_transposed,
                )
                if weight_value.dtype != ir.DataType.FLOAT:
                    cast = ir.node("Cast", [dense], {"to": weight_value.dtype}, name=f"{prefix}/cast")
                    cast.outputs[0].name = f"{prefix}/cast_out"
                    graph.insert_before(node, cast)
                    dense = cast.outputs[0]
                node.replace_input_with(1, dense)
            else:
                arrays = self._emit_custom(model, node, layer, prefix, quantized[layer.key])
            del graph.initializers[layer.weight]
            stored[layer.key] = {role: value.name for role, value in arrays.items()}
        if self.config.form == "custom":
            for model in ctx.models.values():
                model.opset_imports.setdefault(CUSTOM_DOMAIN, 1)
        return PassResult({"stored": stored}, {"layers": len(stored), "form": self.config.form})

    @staticmethod
    def _emit_custom(model, node, layer, prefix, weight):
        graph = model.graph
        bias = None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            if c.shape is not None and tuple(c.shape) == (layer.out_features,):
                bias = c
            else:
                raise RecipeError(
                    f"Gemm {node.name!r} has a bias of shape {c.shape} that VQGemm cannot take",
                    "use the decomposed form (fuse-vq-gemm form: decomposed)",
                )
        old_output = node.outputs[0]
        new_output = ir.Value(name=f"{prefix}/out", shape=old_output.shape, type=old_output.type)
        _new_node, arrays = emit_custom_node(graph, node, prefix, weight, node.inputs[0], bias, new_output)
        name = old_output.name
        # find_linear_layers never picks a node whose output is a graph output, so only uses move.
        old_output.replace_all_uses_with(new_output)
        graph.remove(node, safe=True)
        new_output.name = name
        return arrays
