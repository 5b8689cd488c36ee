"""Capture of a whole VLM (vision tower + projector + language model) as one ONNX graph.

``torch.export`` cannot trace some of what a transformers VLM does in its forward (Qwen's vision tower
splits attention on the data-dependent ``image_grid_thw`` with ``.tolist()``), and the rest depends on
inputs that are not tensors of the graph (image sizes, grids, token types). Each family therefore gets a
small adapter module that

- precomputes, eagerly and for the example's fixed image geometry, every index tensor that depends on
  image sizes or on where the image sits in the prompt (vision rotary tables, attention segments, window
  permutations, mrope ``position_ids``, prefix attention masks), and keeps them as buffers;
- calls the model's own submodules for everything that carries weights, so the math is unchanged;
- merges image features into the text embeddings with a gather over the running count of image tokens,
  which equals ``masked_scatter`` and exports as static-shape ops.

The graph takes the vision input (``pixel_values``) and ``input_ids`` as separate inputs and returns
``logits``; gradients of a loss on the logits reach both the vision and the language weights.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

from mgvq_compile.capture.torch_capture import capture_module
from mgvq_compile.graph import restore_weight_names
from mgvq_compile.errors import CaptureError

__all__ = ["CaptureSpec", "capture_vlm", "vlm_adapter", "weight_modules", "ADAPTERS"]

logger = logging.getLogger(__name__)

_HF = "hf"  # the adapter's attribute holding the original model; stripped from weight names


@dataclass(frozen=True)
class CaptureSpec:
    """What a captured VLM graph takes and returns, and which input sizes the capture covers."""

    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, tuple]
    notes: str
    input_dtypes: dict[str, str] = field(default_factory=dict)


def merge_image_features(
    inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Put the rows of ``image_features`` at the image-token positions of ``input_ids``, in order.

    Same result as ``inputs_embeds.masked_scatter(mask, image_features)``, written as a gather over the
    running count of image tokens so that it exports with static shapes.
    """
    hidden = inputs_embeds.shape[-1]
    rows = image_features.reshape(-1, hidden).to(inputs_embeds.dtype)
    mask = input_ids == image_token_id
    index = torch.cumsum(mask.reshape(-1).to(torch.int64), dim=0) - 1
    index = index.clamp(min=0, max=rows.shape[0] - 1)
    gathered = rows.index_select(0, index).reshape(inputs_embeds.shape)
    return torch.where(mask.unsqueeze(-1), gathered, inputs_embeds)


def _softcap(logits: torch.Tensor, text_config: Any) -> torch.Tensor:
    cap = getattr(text_config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _recorded_input(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The first positional input ``module`` receives while ``run()`` executes eagerly."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    if not seen:
        raise CaptureError(f"{type(module).__name__} was not called while precomputing the capture's indices")
    return seen[0]


class VlmAdapter(nn.Module):
    """Base adapter: ``forward(<vision inputs>, input_ids) -> logits`` over the original model's modules."""

    vision_inputs: tuple[str, ...] = ("pixel_values",)
    notes: str = ""

    def __init__(self, model: nn.Module, example_inputs: dict[str, torch.Tensor]):
        super().__init__()
        setattr(self, _HF, model)
        self.image_token_id = int(model.config.image_token_id)
        self.example_inputs = dict(example_inputs)

    @property
    def model(self) -> nn.Module:
        return getattr(self, _HF)

    @property
    def input_names(self) -> list[str]:
        return [*self.vision_inputs, "input_ids"]

    def graph_inputs(self) -> dict[str, torch.Tensor]:
        return {name: self.example_inputs[name] for name in self.input_names}

    # per-family hooks
    def image_features(self, *vision: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def language_kwargs(self) -> dict[str, Any]:
        return {}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        vision = [inputs[name] for name in self.vision_inputs]
        input_ids = inputs["input_ids"]
        embeds = self.embed(input_ids)
        embeds = merge_image_features(embeds, input_ids, self.image_features(*vision), self.image_token_id)
        out = self.language_model()(inputs_embeds=embeds, use_cache=False, **self.language_kwargs())
        logits = self.model.lm_head(out.last_hidden_state)
        return _softcap(logits, self.model.config.get_text_config())


# --- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------------


def _qwen_vision_attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           lengths: list[int]) -> torch.Tensor:
    """Qwen's ``VisionAttention.forward`` with the segment lengths given as Python ints."""
    mod = sys.modules[type(attn).__module__]
    seq = x.shape[0]
    q, k, v = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    impl = attn.config._attn_implementation
    attention = mod.eager_attention_forward if impl in (None, "eager") or "flash" in impl else \
        mod.ALL_ATTENTION_FUNCTIONS.get_interface(impl, mod.eager_attention_forward)
    outs = [
        attention(attn, qs, ks, vs, attention_mask=None, scaling=attn.scaling, dropout=0.0, is_causal=False)[0]
        for qs, ks, vs in zip(*(torch.split(t, lengths, dim=2) for t in (q, k, v)))
    ]
    return attn.proj(torch.cat(outs, dim=1).reshape(seq, -1))


def _segment_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(n) for n in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist() if n > 0]


class QwenVLAdapter(VlmAdapter):
    """Qwen2-VL and Qwen2.5-VL: vision rotary tables, attention segments, the 2.5 window permutation and the
    mrope position ids, all precomputed for the example's ``image_grid_thw`` and prompt layout."""

    notes = ("fixed image grid (image_grid_thw) and fixed prompt layout: the mrope position_ids are "
             "precomputed from the example's input_ids, so the image tokens must sit at the same positions")

    def __init__(self, model: nn.Module, example_inputs: dict[str, torch.Tensor]):
        super().__init__(model, example_inputs)
        from transformers import vision_utils as vu

        if "image_grid_thw" not in example_inputs:
            raise CaptureError("the example inputs of a Qwen VL model lack image_grid_thw",
                               "pass the image processor's output (pixel_values and image_grid_thw)")
        visual = model.model.visual
        grid = example_inputs["image_grid_thw"]
        input_ids = example_inputs["input_ids"]
        token_types = example_inputs.get("mm_token_type_ids")
        if token_types is None:  # older processors: image tokens are the only multimodal ones here
            token_types = (input_ids == self.image_token_id).to(torch.int32)
        merge = visual.spatial_merge_size
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        with torch.no_grad():
            position_ids = vu.get_vision_position_ids(grid, merge)
            dummy = torch.zeros(1, dtype=torch.float32)
            cos, sin = visual.rotary_pos_emb(dummy, position_ids)
            self.full_lengths = _segment_lengths(vu.get_vision_cu_seqlens(grid))
            if self.windowed:
                window_index, cu_window = vu.get_vision_window_index(
                    grid, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size)
                self.window_lengths = _segment_lengths(cu_window)
                unit = merge * merge
                seq = cos.shape[0]
                cos = visual.permute_input_for_window_attn(cos, window_index, seq)
                sin = visual.permute_input_for_window_attn(sin, window_index, seq)
                patch_order = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)
                self.register_buffer("patch_order", patch_order, persistent=False)
                self.register_buffer("reverse_order", torch.argsort(window_index), persistent=False)
            rope_ids, _ = model.model.get_rope_index(
                input_ids, token_types, image_grid_thw=grid,
                attention_mask=example_inputs.get("attention_mask"))
        self.register_buffer("vision_cos", cos.float(), persistent=False)
        self.register_buffer("vision_sin", sin.float(), persistent=False)
        self.register_buffer("text_position_ids", rope_ids, persistent=False)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        visual = self.model.model.visual
        x = visual.patch_embed(pixel_values.to(visual.dtype))
        if self.windowed:
            x = x.index_select(0, self.patch_order)
        for i, block in enumerate(visual.blocks):
            full = not self.windowed or i in visual.fullatt_block_indexes
            lengths = self.full_lengths if full else self.window_lengths
            x = x + _qwen_vision_attention(block.attn, block.norm1(x), self.vision_cos, self.vision_sin, lengths)
            x = x + block.mlp(block.norm2(x))
        merged = visual.merger(x)
        if self.windowed:
            merged = merged.index_select(0, self.reverse_order)
        return merged

    def language_kwargs(self) -> dict[str, Any]:
        return {"position_ids": self.text_position_ids}


# --- LLaVA-OneVision -------------------------------------------------------------------------------


class LlavaOnevisionAdapter(VlmAdapter):
    """LLaVA-OneVision: ``image_sizes`` becomes a Python list, so the anyres tiling, unpadding and newline
    packing are resolved at trace time."""

    notes = "fixed image size (image_sizes) and number of crops: the anyres tiling is resolved at capture"

    def __init__(self, model: nn.Module, example_inputs: dict[str, torch.Tensor]):
        super().__init__(model, example_inputs)
        self.image_sizes = [[int(v) for v in hw] for hw in example_inputs["image_sizes"].tolist()]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values, self.image_sizes, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio, return_dict=True)
        return torch.cat(out.pooler_output, dim=0)


# --- InternVL --------------------------------------------------------------------------------------


class InternVLAdapter(VlmAdapter):
    """InternVL: the vision path exports as written; only the feature merge is replaced."""

    notes = "fixed image size and number of image tiles"

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
        return out.pooler_output


# --- SmolVLM / Idefics3 ----------------------------------------------------------------------------


class SmolVLMAdapter(VlmAdapter):
    """SmolVLM: the patch position ids (bucketized in the embeddings) are recorded eagerly for the fixed
    image size, which also drops the padding-image filter; every image is real and unpadded."""

    notes = ("fixed image size and number of images; every image is real and unpadded "
             "(pixel_attention_mask all ones)")

    def __init__(self, model: nn.Module, example_inputs: dict[str, torch.Tensor]):
        super().__init__(model, example_inputs)
        pixel_values = example_inputs["pixel_values"]
        embeddings = model.model.vision_model.embeddings
        position_ids = _recorded_input(
            embeddings.position_embedding, lambda: model.model.get_image_features(pixel_values))
        self.register_buffer("patch_position_ids", position_ids, persistent=False)

    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.model.model.vision_model
        batch, images = pixel_values.shape[:2]
        pv = pixel_values.reshape(batch * images, *pixel_values.shape[2:]).to(self.model.dtype)
        x = vision.embeddings.patch_embedding(pv).flatten(2).transpose(1, 2)
        x = x + vision.embeddings.position_embedding(self.patch_position_ids)
        x = vision.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
        x = vision.post_layernorm(x)
        return self.model.model.connector(x)


# --- PaliGemma -------------------------------------------------------------------------------------


class PaliGemmaAdapter(VlmAdapter):
    """PaliGemma: the prefix-bidirectional attention mask (from ``token_type_ids``) and the 1-based position
    ids are precomputed for the example's prompt layout."""

    notes = ("fixed image size and fixed prompt layout: the prefix (image + prompt, bidirectional) and suffix "
             "(causal) lengths come from the example's token_type_ids")

    def __init__(self, model: nn.Module, example_inputs: dict[str, torch.Tensor]):
        super().__init__(model, example_inputs)
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if self.image_token_id >= model.model.vocab_size:
            raise CaptureError(
                "PaliGemma's image token id is outside the text vocabulary",
                "capture a checkpoint whose image_token_index < text vocab_size")
        input_ids = example_inputs["input_ids"]
        text_config = model.config.get_text_config()
        with torch.no_grad():
            embeds = self.embed(input_ids)
            position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0) + 1  # PaliGemma is 1-indexed
            kwargs: dict[str, Any] = {"config": text_config, "inputs_embeds": embeds, "attention_mask": None,
                                      "past_key_values": None, "position_ids": position_ids}
            token_type_ids = example_inputs.get("token_type_ids")
            if token_type_ids is not None:
                kwargs["block_sequence_ids"] = torch.where(token_type_ids == 0, 0, -1)
            mask = create_causal_mask(**kwargs)
            sliding = None
            if getattr(text_config, "sliding_window", None) is not None:
                sliding = create_sliding_window_causal_mask(**kwargs)
        self.register_buffer("text_position_ids", position_ids, persistent=False)
        self.register_buffer("full_mask", mask, persistent=False)
        self.register_buffer("sliding_mask", sliding, persistent=False)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_image_features(pixel_values, return_dict=True).pooler_output

    def language_kwargs(self) -> dict[str, Any]:
        mask: Any = self.full_mask
        if self.sliding_mask is not None:
            mask = {"full_attention": self.full_mask, "sliding_attention": self.sliding_mask}
        return {"position_ids": self.text_position_ids, "attention_mask": mask}


ADAPTERS: dict[str, type[VlmAdapter]] = {
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": QwenVLAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "internvl": InternVLAdapter,
    "smolvlm": SmolVLMAdapter,
    "paligemma": PaliGemmaAdapter,
}


def vlm_adapter(model: nn.Module, example_inputs: dict[str, torch.Tensor]) -> VlmAdapter:
    """The capture adapter for ``model`` (dispatch on ``model.config.model_type``), in eval mode."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise CaptureError(
            f"no VLM capture adapter for model_type {model_type!r} ({type(model).__name__})",
            f"supported: {', '.join(sorted(ADAPTERS))}; add an adapter in mgvq_compile.capture.vlm, "
            "or capture the vision encoder and the language model as separate graphs")
    missing = [name for name in ("input_ids", "pixel_values") if name not in example_inputs]
    if missing:
        raise CaptureError(f"the example inputs of a {model_type} VLM lack {', '.join(missing)}",
                           "pass the processor's output for one image and a prompt holding its image tokens")
    if getattr(model.config, "image_token_id", None) is None:
        raise CaptureError(f"{type(model).__name__}'s config has no image_token_id")
    return ADAPTERS[model_type](model.eval(), example_inputs).eval()


def capture_vlm(model: nn.Module, example_inputs: dict[str, torch.Tensor]) -> tuple[ir.Model, CaptureSpec]:
    """Capture a transformers VLM as ONE graph ``(pixel_values, input_ids) -> logits`` through its adapter."""
    adapter = vlm_adapter(model, example_inputs)
    inputs = adapter.graph_inputs()
    start = time.perf_counter()
    graph = capture_module(adapter, inputs, output_names=["logits"])
    restore_weight_names(graph, prefix=f"{_HF}.")
    logger.info("captured %s (%s) in %.1fs", type(model).__name__, model.config.model_type,
                time.perf_counter() - start)
    shapes = {name: tuple(t.shape) for name, t in inputs.items()}
    notes = (f"{model.config.model_type}: {adapter.notes}; batch and sequence length fixed at "
             f"{tuple(inputs['input_ids'].shape)} with exactly "
             f"{int((inputs['input_ids'] == adapter.image_token_id).sum())} image tokens; no attention_mask "
             "(unpadded prompts)")
    spec = CaptureSpec(
        input_names=list(inputs), output_names=["logits"], input_shapes=shapes, notes=notes,
        input_dtypes={name: str(t.dtype).removeprefix("torch.") for name, t in inputs.items()},
    )
    return graph, spec


def weight_modules(model_ir: ir.Model) -> dict[str, str]:
    """Initializer name -> module path (the name less ``.weight``) for every initializer that feeds a
    MatMul or Gemm directly as its weight operand (input 1)."""
    weights: dict[str, str] = {}
    for node in model_ir.graph.all_nodes():
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        value = node.inputs[1]
        if value is not None and value.is_initializer() and value.name:
            weights[value.name] = value.name.rsplit(".", 1)[0]
    return weights
