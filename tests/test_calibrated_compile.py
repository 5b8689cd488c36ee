"""Compiles that run the calibration executor: statistics, reuse of calibration, calibration errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from mgvq_compile.cli import main
from onnx_builders import mlp_model, save_mlp


def run_cli(*args) -> int:
    return main([*map(str, args), "-q"])


@pytest.fixture()
def mlp(tmp_path) -> Path:
    return save_mlp(tmp_path / "mlp.onnx", hidden=64, inputs=32, outputs=16)


def write_calib(directory: Path, count: int = 3, *, labels: bool = True, key: str = "x") -> Path:
    directory.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        feed = {key: rng.standard_normal((2, 8, 32)).astype(np.float32)}
        if labels:
            feed["labels"] = rng.integers(0, 16, size=(2, 8)).astype(np.int64)
        np.savez(directory / f"{i:03d}.npz", **feed)
    return directory


def gradient_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "grad.yaml"
    recipe.write_text(
        "mgvq_recipe: 1\nmethod: custom\npasses:\n- pass: collect-stats\n  gradients: true\n"
        "- pass: quantize-kmeans-vq\n  bits: 2\n- pass: fuse-vq-gemm\n"
    )
    return recipe


def test_calibration_gives_proxy_losses_and_late_changes_reuse_it(tmp_path, mlp):
    calib = write_calib(tmp_path / "calib")
    work = tmp_path / "work"
    assert run_cli(mlp, "--calib", calib, "-o", tmp_path / "a", "--work-dir", work) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    losses = [layer["proxy_loss"] for layer in report["layers"]]
    assert all(isinstance(v, float) and 0.0 < v < 1.0 for v in losses)
    assert report["resumed_passes"] == []
    assert run_cli(mlp, "--calib", calib, "--bits", "3", "-o", tmp_path / "b", "--work-dir", work) == 0
    report_b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report_b["resumed_passes"] == ["collect-stats"]
    assert sum(l["proxy_loss"] for l in report_b["layers"]) < sum(losses)


def test_gradient_recipe_needs_labels_or_model_labels(tmp_path, mlp, capsys):
    calib = write_calib(tmp_path / "calib", labels=False)
    recipe = gradient_recipe(tmp_path)
    assert run_cli(mlp, "--calib", calib, "--recipe", recipe, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "labels" in err and "--labels model" in err
    assert not (tmp_path / "out").exists()
    assert run_cli(mlp, "--calib", calib, "--recipe", recipe, "--labels", "model", "-o", tmp_path / "out", "--no-resume") == 0


def test_gradient_statistics_with_labels(tmp_path, mlp):
    import mgvq_compile

    calib = write_calib(tmp_path / "calib")
    result = mgvq_compile.compile(
        str(mlp), recipe=gradient_recipe(tmp_path), calib=str(calib), output=tmp_path / "out", resume=False, progress=False
    )
    assert result.report["summary"]["quantized_layers"] == 3


def test_empty_and_mismatched_calibration(tmp_path, mlp, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(mlp, "--calib", empty, "-o", tmp_path / "out") == 2
    assert "no .npz files" in capsys.readouterr().err
    wrong = write_calib(tmp_path / "wrong", key="input_ids")
    assert run_cli(mlp, "--calib", wrong, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "missing: x" in err and "input_ids" in err
    assert run_cli(mlp, "--calib", tmp_path / "absent", "-o", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


def test_op_without_converter_is_named(tmp_path, capsys):
    model = mlp_model(0, hidden=64, inputs=32, outputs=16)
    relu = next(n for n in model.graph.node if n.name == "relu1")
    relu.op_type, relu.domain = "Swoosh", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 3))
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    calib = write_calib(tmp_path / "calib")
    assert run_cli(path, "--calib", calib, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Swoosh" in err and "opset 3" in err and "relu1" in err
    assert not (tmp_path / "out").exists()
    # without calibration the same graph compiles: no executor needed
    assert run_cli(path, "--method", "rtn", "-o", tmp_path / "out", "--no-resume") == 0


def test_hessian_aware_methods_beat_round_to_nearest(tmp_path, mlp):
    """gptq/vlmq/gptvq on the same statistics: proxy loss below their rounding-only counterparts."""
    calib = write_calib(tmp_path / "calib", count=4)
    proxy = {}
    for method in ("rtn", "gptq", "vlmq", "kmeans-vq", "gptvq"):
        out = tmp_path / method
        assert run_cli(mlp, "--method", method, "--bits", "2", "--calib", calib, "-o", out, "--work-dir", tmp_path / "w") == 0
        report = json.loads((out / "report.json").read_text())
        proxy[method] = sum(layer["proxy_loss"] for layer in report["layers"])
    assert proxy["gptq"] < proxy["rtn"]
    assert proxy["vlmq"] < proxy["rtn"]
    assert proxy["gptvq"] < proxy["kmeans-vq"]


def test_gptvq_recipe_keeps_its_codebooks_at_most_256_codewords():
    from mgvq_compile.recipes import builtin_recipe

    dims = {}
    for bits in range(1, 9):
        (quantize,) = [p for p in builtin_recipe("gptvq", bits=bits, calibrated=True).passes if p.name == "quantize-gptvq"]
        dims[bits] = quantize.config.vector_dim
    assert dims == {1: 4, 2: 4, 3: 2, 4: 2, 5: 1, 6: 1, 7: 1, 8: 1}
    # --set still overrides it.
    recipe = builtin_recipe("gptvq", bits=3, calibrated=True).with_options({"quantize-gptvq.vector_dim": 4})
    assert [p.config.vector_dim for p in recipe.passes if p.name == "quantize-gptvq"] == [4]


def test_methods_that_need_calibration_say_so(tmp_path, mlp, capsys):
    assert run_cli(mlp, "--method", "gptq", "-o", tmp_path / "out") == 2
    assert "needs calibration data" in capsys.readouterr().err
    no_labels = write_calib(tmp_path / "calib", labels=False)
    assert run_cli(mlp, "--method", "vlmq", "--calib", no_labels, "-o", tmp_path / "out") == 2
    assert "--labels model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gptvq_codebook_update_lowers_every_layers_proxy_loss(tmp_path, mlp):
    """GPTVQ's codebook update re-solves the codewords for the rounded codes under H_X: no layer's proxy loss
    tr((W - Q) H_X (W - Q)^T) rises, the model's falls, and the stored bits are the same."""
    calib = write_calib(tmp_path / "calib", count=4)
    reports = {}
    for name, extra in (("updated", ()), ("as-fitted", ("--set", "quantize-gptvq.codebook_update=false"))):
        out = tmp_path / name
        assert run_cli(mlp, "--method", "gptvq", "--bits", "2", "--calib", calib, "-o", out,
                       "--work-dir", tmp_path / "w", *extra) == 0
        reports[name] = json.loads((out / "report.json").read_text())
    updated, fitted = ({layer["name"]: layer["proxy_loss"] for layer in reports[k]["layers"]} for k in ("updated", "as-fitted"))
    assert updated.keys() == fitted.keys() and len(updated) == 3
    assert all(updated[name] <= fitted[name] + 1e-9 for name in updated)
    assert sum(updated.values()) < sum(fitted.values())
    assert reports["updated"]["summary"]["bits_per_weight"] == reports["as-fitted"]["summary"]["bits_per_weight"]
