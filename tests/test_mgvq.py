"""The mgvq recipe end to end on a small MLP: budget held with everything stored, and its ablations."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import onnx
import onnx_ir
import pytest
import yaml

from mgvq_compile.cli import main
from mgvq_compile.plots import PLOT_FILES
from mgvq_compile.runtime import create_session
from onnx_builders import save_mlp
from test_calibrated_compile import write_calib


# The layout of the defaults before config version 14 (d = 2, four groups, whole widths): the tiny test
# models' layers are too small to pay for d = 4 codebooks at 2 bits, and whole widths starve layers to 1 bit.
D2_FOUR_GROUPS = ("--set", "assign-bits.vector_dim=2", "--set", "assign-bits.groups=4",
                  "--set", "assign-bits.fractional_widths=false")


def run_cli(*args) -> int:
    return main([*map(str, args), "-q"])


def _mlp_with_calibration(tmp_path):
    mlp = save_mlp(tmp_path / "mlp.onnx", hidden=256, inputs=32 * 4, outputs=16)
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.savez(calib_dir / f"{i}.npz", x=rng.standard_normal((2, 8, 128)).astype(np.float32),
                 labels=rng.integers(0, 16, size=(2, 8)).astype(np.int64))
    return mlp, calib_dir


def _compile_mgvq(tmp_path, mlp, calib_dir, name: str, *options) -> tuple:
    """Compile ``mlp`` with mgvq and ``options``; (output dir, report)."""
    out = tmp_path / name
    assert run_cli(mlp, "--method", "mgvq", "--calib", calib_dir, "-o", out, "--work-dir", tmp_path / "work",
                   *options) == 0
    return out, json.loads((out / "report.json").read_text())


def test_mgvq_holds_the_budget_and_runs_in_ort(tmp_path):
    mlp, calib_dir = _mlp_with_calibration(tmp_path)
    rng = np.random.default_rng(1)
    reports = {}
    for method in ("mgvq", "mgvq-no-alloc", "mgvq-no-grad", "kmeans-vq"):
        out = tmp_path / method
        assert run_cli(mlp, "--method", method, "--bits", "2", "--calib", calib_dir, "-o", out,
                       "--work-dir", tmp_path / "work") == 0, method
        reports[method] = json.loads((out / "report.json").read_text())
        x = rng.standard_normal((2, 8, 128)).astype(np.float32)
        (y,) = create_session(out / "model.onnx").run(None, {"x": x})
        assert np.isfinite(y).all()
    for method in ("mgvq", "mgvq-no-grad"):
        summary = reports[method]["summary"]
        assert summary["bits_per_weight"] <= 2.0, (method, summary)  # everything stored counts
        # the defaults at 2 bits: one group per layer, d = 4
        assert all(len(layer["bits"]) == 1 and layer["vector_dim"] == 4 for layer in reports[method]["layers"])
    # no allocation: one group per layer, 2 index bits everywhere, codebooks on top (as gptvq), no permutation
    no_alloc = reports["mgvq-no-alloc"]
    assert all(layer["bits"] == [2] for layer in no_alloc["layers"])
    assert no_alloc["summary"]["index_bits_per_weight"] == 2.0 < no_alloc["summary"]["bits_per_weight"]
    assert all("perm" not in layer["stored_bytes"] for layer in no_alloc["layers"])
    for layer in reports["mgvq-no-grad"]["layers"]:
        assert len(layer["sensitivity"]) == len(layer["bits"]) and layer["global_sensitivity"] > 0
        assert layer["codebook_scope"] == "layer-group"
    before = np.mean([layer["proxy_loss_before_compensation"] for layer in reports["mgvq-no-grad"]["layers"]])
    after = np.mean([layer["proxy_loss"] for layer in reports["mgvq-no-grad"]["layers"]])
    assert after < before, (before, after)  # second-order compensation lowers the proxy it minimises
    unrefined = np.mean([layer["proxy_loss_before_refinement"] for layer in reports["mgvq-no-grad"]["layers"]])
    assert after < unrefined, (unrefined, after)  # codebooks re-solved for the codes lower it further
    # refine, re-round, refine, ...: at most 2 * refine_rounds - 1 = 5 steps, at least the first refinement
    assert all(1 <= layer["refinement_steps"] <= 5 for layer in reports["mgvq-no-grad"]["layers"])


def test_set_overrides_pass_options_and_plots_are_written(tmp_path, capsys):
    mlp, calib_dir = _mlp_with_calibration(tmp_path)
    out, report = _compile_mgvq(tmp_path, mlp, calib_dir, "out", "--set", "compensate.lam=0.2",
                                "--set", "*.vector_dim=2", "--set", "assign-bits.groups=2", "--plots")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    options = {p["pass"]: p for p in recipe["passes"]}
    assert options["compensate"]["lam"] == 0.2 and options["assign-bits"]["groups"] == 2
    assert all(p["vector_dim"] == 2 for p in recipe["passes"] if "vector_dim" in p)
    assert {layer["vector_dim"] for layer in report["layers"]} == {2}
    assert all(len(layer["bits"]) == 2 for layer in report["layers"])
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad"
    for option, message in (("compensate.nope=1", "has no option"), ("nopass.lam=1", "has no pass"),
                            ("lam", "PASS.OPTION=VALUE")):
        assert run_cli(mlp, "--method", "mgvq", "--calib", calib_dir, "-o", bad, "--set", option) == 2
        assert message in capsys.readouterr().err and not bad.exists()


def test_codebooks_shared_per_modality(tmp_path):
    import onnx
    from onnx import numpy_helper

    mlp, calib_dir = _mlp_with_calibration(tmp_path)
    out, report = _compile_mgvq(tmp_path, mlp, calib_dir, "shared", "--set", "fit-codebooks.scope=modality")
    assert {layer["codebook_scope"] for layer in report["layers"]} == {"modality"}
    assert not any("proxy_loss_before_refinement" in layer for layer in report["layers"])  # shared: not refined
    assert report["summary"]["bits_per_weight"] <= 2.0  # every layer's stored copy still counts
    model = onnx.load(out / "model.onnx")
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    books_by_bits: dict[int, list[np.ndarray]] = {}
    for node in model.graph.node:
        if node.op_type != "VQGemm":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        rows = inits[node.input[2]]
        code_widths = attrs.get("group_code_bits") or [b * attrs["vector_dim"] for b in attrs["group_bits"]]
        for code_width in code_widths:
            k = 1 << code_width
            books_by_bits.setdefault(code_width, []).append(rows[:k])
            rows = rows[k:]
    assert sum(len(books) for books in books_by_bits.values()) > len(books_by_bits)  # something is shared
    for books in books_by_bits.values():  # one modality ("text" or "other") in this MLP: one codebook per bits
        assert all(np.array_equal(book, books[0]) for book in books)

    assert run_cli(mlp, "--method", "mgvq", "--calib", calib_dir, "-o", tmp_path / "bad",
                   "--set", "fit-codebooks.scope=global") == 2


def test_global_weighting_off_gives_every_layer_the_same_scale(tmp_path):
    _out, report = _compile_mgvq(tmp_path, *_mlp_with_calibration(tmp_path), "flat", "--set", "assign-bits.global_weighting=false")
    assert {layer["global_sensitivity"] for layer in report["layers"]} == {1.0}
    for layer in report["layers"]:  # local scores only split the layer's unit scale among its groups
        widths = np.diff(layer["group_bounds"])
        assert np.average(layer["sensitivity"], weights=widths) == pytest.approx(1.0)
    assert report["summary"]["bits_per_weight"] <= 2.0


def test_global_exponent_tempers_the_global_term(tmp_path):
    mlp, calib = _mlp_with_calibration(tmp_path)
    _out, full = _compile_mgvq(tmp_path, mlp, calib, "full", "--set", "assign-bits.global_exponent=1")
    _out, half = _compile_mgvq(tmp_path, mlp, calib, "half")  # 0.5, the default
    _out, none = _compile_mgvq(tmp_path, mlp, calib, "none", "--set", "assign-bits.global_exponent=0")
    for layer_full, layer_half, layer_none in zip(full["layers"], half["layers"], none["layers"]):
        assert layer_half["global_sensitivity"] == pytest.approx(layer_full["global_sensitivity"] ** 0.5)
        assert layer_none["global_sensitivity"] == 1.0
    assert all(report["summary"]["bits_per_weight"] <= 2.0 for report in (full, half, none))
    assert run_cli(mlp, "--method", "mgvq", "--calib", calib, "-o", tmp_path / "bad",
                   "--set", "assign-bits.global_exponent=2") == 2


def test_distortion_model_reaches_the_allocation(tmp_path):
    mlp, calib = _mlp_with_calibration(tmp_path)

    def bits(name, *options):
        _out, report = _compile_mgvq(tmp_path, mlp, calib, name, "--bits", "2.5", *D2_FOUR_GROUPS,
                                     "--set", "assign-bits.allowed_bits=[1,2,3,4]", *options)
        assert report["summary"]["bits_per_weight"] <= 2.5
        return [layer["bits"] for layer in report["layers"]]

    named = bits("named", "--set", "assign-bits.distortion=compensated")
    assert bits("steps", "--set", "assign-bits.distortion_steps=[5.2,4.2,3.2]") == named
    # A curve on which the step from 1 to 2 bits is nearly worthless leaves more groups at 1 bit.
    flat_start = bits("flat-start", "--set", "assign-bits.distortion_steps=[1.01,4,4]")
    ones = [sum(b == 1 for layer in widths for b in layer) for widths in (named, flat_start)]
    assert ones[1] > ones[0], (named, flat_start)


def test_min_bits_floors_the_named_layers_within_the_budget(tmp_path, capsys):
    mlp, calib = _mlp_with_calibration(tmp_path)
    _out, free = _compile_mgvq(tmp_path, mlp, calib, "free")
    names = [layer["name"] for layer in free["layers"]]
    starved = min(free["layers"], key=lambda layer: sum(layer["bits"]))  # the layer the allocation starves
    assert min(starved["bits"]) < 2
    rule = f"^{re.escape(starved['name'])}$=2"
    _out, floored = _compile_mgvq(tmp_path, mlp, calib, "floored", "--set", f"assign-bits.min_bits={json.dumps([rule])}")
    by_name = {layer["name"]: layer["bits"] for layer in floored["layers"]}
    assert list(by_name) == names
    assert min(by_name[starved["name"]]) >= 2
    assert floored["summary"]["bits_per_weight"] <= 2.0
    others = [b for name, bits in by_name.items() if name != starved["name"] for b in bits]
    free_others = [b for layer in free["layers"] if layer["name"] != starved["name"] for b in layer["bits"]]
    assert sum(others) < sum(free_others)  # the other layers paid for the floor

    capsys.readouterr()
    for rule, message in (("no_such_layer=2", "no layer name matches"), ("q_proj", "is not REGEX=BITS"),
                          ("(=2", "is not REGEX=BITS"), (".=4", "not an allowed width")):
        assert run_cli(mlp, "--method", "mgvq", "--calib", calib, "-o", tmp_path / "bad", "--work-dir", tmp_path / "work",
                       "--set", f"assign-bits.min_bits={json.dumps([rule])}") == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_query_and_key_projections_get_at_least_the_budget_bits(tmp_path):
    mlp, calib = _mlp_with_calibration(tmp_path)
    off = ("--set", "assign-bits.query_key_floor=false")
    _out, free = _compile_mgvq(tmp_path, mlp, calib, "free", *off)
    starved = min(free["layers"], key=lambda layer: sum(layer["bits"]))["name"]
    assert min(next(layer["bits"] for layer in free["layers"] if layer["name"] == starved)) < 2
    renamed = "block.attn.q_proj.weight"  # the same model, its starved layer named as a query projection
    proto = onnx.load(str(mlp))
    next(init for init in proto.graph.initializer if init.name == starved).name = renamed
    for node in proto.graph.node:
        node.input[:] = [renamed if name == starved else name for name in node.input]
    onnx.save(proto, str(tmp_path / "attn.onnx"))

    _out, unfloored = _compile_mgvq(tmp_path, tmp_path / "attn.onnx", calib, "unfloored", *off)
    assert [layer["bits"] for layer in unfloored["layers"]] == [layer["bits"] for layer in free["layers"]]
    _out, floored = _compile_mgvq(tmp_path, tmp_path / "attn.onnx", calib, "floored")
    query = next(layer for layer in floored["layers"] if layer["name"] == renamed)
    assert min(query["bits"]) >= 2
    assert floored["summary"]["bits_per_weight"] <= 2.0
    _out, uniform = _compile_mgvq(tmp_path, tmp_path / "attn.onnx", calib, "no-alloc-floor", "--set",
                                  "assign-bits.uniform=true", "--set", "assign-bits.groups=1")
    assert all(layer["bits"] == [2] for layer in uniform["layers"])  # uniform widths: the floor is moot


@pytest.mark.parametrize("name, is_query_or_key", [
    ("model.decoder.layers.0.encoder_attn.q_proj.weight", True), ("model.layers.3.self_attn.k_proj.weight", True),
    ("encoder.layer.0.attention.self.query.weight", True), ("model.layers.3.self_attn.v_proj.weight", False),
    ("model.layers.3.self_attn.o_proj.weight", False), ("keyboard.weight", False), ("onnx::MatMul_12", False),
])
def test_query_key_names(name, is_query_or_key):
    from mgvq_compile.passes.assign_bits import QUERY_KEY_PATTERN

    assert bool(QUERY_KEY_PATTERN.search(name)) == is_query_or_key


def test_query_key_floor_width():
    from mgvq_compile.passes.assign_bits import AssignBitsConfig

    assert (AssignBitsConfig().query_key_bits, AssignBitsConfig(bits=3.0).query_key_bits) == (2, 3)
    assert AssignBitsConfig(bits=2.5, allowed_bits=(1, 3)).query_key_bits == 3
    assert AssignBitsConfig(query_key_floor=False).query_key_bits == 0


def test_vector_dim_follows_the_budget():
    from mgvq_compile.errors import RecipeError
    from mgvq_compile.passes.assign_bits import AssignBitsConfig

    assert [AssignBitsConfig(bits=b).dim for b in (1.0, 2.0, 2.5, 2.9, 3.0, 4.0, 5.0)] == [4, 4, 4, 4, 2, 2, 1]
    assert AssignBitsConfig(bits=3.0, vector_dim=4).dim == 4  # set by hand, it stays
    assert AssignBitsConfig().widths == (1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3)  # fractional by default
    assert AssignBitsConfig(bits=3.0).widths == (2, 2.5, 3, 3.5, 4)
    with pytest.raises(RecipeError, match="vector_dim must be positive"):
        AssignBitsConfig(vector_dim=-1)


def test_channel_groups_follow_the_vector_dim():
    from mgvq_compile.errors import RecipeError
    from mgvq_compile.passes.assign_bits import AssignBitsConfig

    # one group where d = 4 codebooks are costly, the method page's four at d = 2 and d = 1
    assert [AssignBitsConfig(bits=b).group_count for b in (2.0, 3.0, 5.0)] == [1, 4, 4]
    assert AssignBitsConfig(bits=2.0, vector_dim=2).group_count == 4
    assert AssignBitsConfig(bits=3.0, groups=1).group_count == 1  # set by hand, it stays
    with pytest.raises(RecipeError, match="groups must be positive, or 0"):
        AssignBitsConfig(groups=-1)


def test_no_alloc_ablation_has_one_group_at_every_budget():
    from mgvq_compile.recipes import builtin_recipe

    def group_count(method, bits):
        (assign,) = [p for p in builtin_recipe(method, bits=bits, calibrated=True).passes if p.name == "assign-bits"]
        return assign.config.group_count

    # module 2 alone has no channel groups, also at 3 bits where mgvq's default (d = 2) is four
    assert [group_count("mgvq-no-alloc", b) for b in (2, 3, 4)] == [1, 1, 1]
    assert [group_count("mgvq", b) for b in (2, 3)] == [1, 4]


def test_fractional_widths_config():
    from mgvq_compile.errors import RecipeError
    from mgvq_compile.passes.assign_bits import AssignBitsConfig

    assert AssignBitsConfig(vector_dim=4, fractional_widths=True).widths == (1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3)
    assert AssignBitsConfig(vector_dim=2, fractional_widths=True).widths == (1, 1.5, 2, 2.5, 3)
    assert AssignBitsConfig(vector_dim=2, allowed_bits=(1.0, 2.0)).widths == (1, 2)  # whole widths stay ints
    with pytest.raises(RecipeError, match="whole, positive number of code bits"):
        AssignBitsConfig(vector_dim=2, allowed_bits=(1.25, 2.0))
    with pytest.raises(RecipeError, match="takes whole widths"):
        AssignBitsConfig(vector_dim=4, fractional_widths=True, distortion="measured")


def test_fractional_widths_hold_the_budget_and_run_in_ort(tmp_path):
    from vq_helpers import stored_vq_bytes

    mlp, calib = _mlp_with_calibration(tmp_path)
    options = ("--bits", "1.9", "--set", "*.vector_dim=4", "--set", "assign-bits.groups=1",
               "--set", "assign-bits.fractional_widths=true")
    out, report = _compile_mgvq(tmp_path, mlp, calib, "custom", *options)
    portable, _ = _compile_mgvq(tmp_path, mlp, calib, "portable", *options, "--portable")
    summary = report["summary"]
    assert summary["bits_per_weight"] <= 1.9
    assert summary["bits_per_weight"] * summary["quantized_weights"] == stored_vq_bytes(out / "model.onnx") * 8
    widths = [b for layer in report["layers"] for b in layer["bits"]]
    assert any(not float(b).is_integer() for b in widths), widths
    nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "VQGemm"]
    # a layer with a fractional width carries code widths; whole-width layers keep group_bits
    assert any(any(a.name == "group_code_bits" for a in n.attribute) for n in nodes)
    x = np.random.default_rng(3).standard_normal((2, 8, 128)).astype(np.float32)
    (y,) = create_session(out / "model.onnx").run(None, {"x": x})
    (y_portable,) = create_session(portable / "model.onnx").run(None, {"x": x})
    np.testing.assert_allclose(y, y_portable, rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=None)
def _anonymous_export(arch: str):
    """A tiny random model exported as torch.onnx does by default (optimize=True): its linear weights are
    anonymous ``val_N`` initializers. (ir model, layers, keys of its query/key projections by parameter name)."""
    from _models import export_to_ir, parameter_sources, tiny_llama, tiny_whisper

    from mgvq_compile.graph import find_linear_layers
    from mgvq_compile.passes.assign_bits import QUERY_KEY_PATTERN

    model, inputs = {"llama": tiny_llama, "whisper": tiny_whisper}[arch]()
    graph = export_to_ir(model, inputs)
    layers = find_linear_layers(graph)
    sources = parameter_sources(graph, {name for name, _ in model.named_parameters()})
    assert not any(QUERY_KEY_PATTERN.search(layer.weight) for layer in layers)  # names do not tell
    truth = {layer.key for layer in layers if QUERY_KEY_PATTERN.search(sources[layer.weight][0])}
    return graph, inputs, layers, truth


@pytest.mark.parametrize("arch, count", [("llama", 4), ("whisper", 6)])  # whisper: self- and cross-attention
def test_query_and_key_projections_found_by_structure(tmp_path, arch, count):
    from mgvq_compile.graph import attention_query_key_layers, find_linear_layers, load_onnx

    graph, _inputs, layers, truth = _anonymous_export(arch)
    assert len(truth) == count
    assert attention_query_key_layers(graph, layers) == truth
    mlp = load_onnx(save_mlp(tmp_path / "mlp.onnx", hidden=64))
    assert attention_query_key_layers(mlp, find_linear_layers(mlp)) == set()  # no attention, no floor


def _save_anonymous_with_calibration(tmp_path, arch: str):
    """The anonymous export of ``arch`` saved as ``ARCH.onnx``, and a calibration directory for it: random
    tokens (and features) whose labels are the next tokens. (model path, calibration dir, query/key keys)."""
    graph, inputs, _layers, truth = _anonymous_export(arch)
    graph = graph.clone()
    for value in graph.graph.initializers.values():
        # As other exporters write it: no record of the folded parameter, which load_onnx would name it by.
        value.metadata_props.pop("pkg.onnxscript.optimizer.folded_from", None)
    path = tmp_path / f"{arch}.onnx"
    onnx_ir.save(graph, str(path))
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    rng = np.random.default_rng(0)
    ids_name = "decoder_input_ids" if "decoder_input_ids" in inputs else "input_ids"
    vocab = {"llama": 128, "whisper": 96}[arch]
    for i in range(2):
        feed = {name: rng.standard_normal(value.shape).astype(np.float32)
                for name, value in inputs.items() if value.is_floating_point()}
        feed[ids_name] = rng.integers(0, vocab, size=inputs[ids_name].shape).astype(np.int64)
        feed["labels"] = np.roll(feed[ids_name], -1, axis=1)
        feed["labels"][:, -1] = -100
        np.savez(calib_dir / f"{i}.npz", **feed)
    return path, calib_dir, truth


def test_the_query_key_floor_holds_for_anonymous_weight_names(tmp_path):
    model, calib_dir, truth = _save_anonymous_with_calibration(tmp_path, "llama")

    def query_key_bits(report) -> list[int]:
        return [min(layer["bits"]) for layer in report["layers"] if layer["name"] in truth]

    _out, free = _compile_mgvq(tmp_path, model, calib_dir, "free", *D2_FOUR_GROUPS,
                               "--set", "assign-bits.query_key_floor=false")
    assert min(query_key_bits(free)) == 1  # the allocation starves some of them
    _out, floored = _compile_mgvq(tmp_path, model, calib_dir, "floored", *D2_FOUR_GROUPS)
    assert min(query_key_bits(floored)) >= 2
    assert floored["summary"]["bits_per_weight"] <= 2.0
