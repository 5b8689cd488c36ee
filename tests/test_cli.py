"""The command line on ONNX files built elsewhere (onnx.helper): outputs, determinism, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import mgvq_compile
from mgvq_compile.cli import main
from mgvq_compile.runtime import create_session
from onnx_builders import save_mlp
from vq_helpers import dequantized_weights, stored_vq_bytes


@pytest.fixture()
def mlp(tmp_path) -> Path:
    return save_mlp(tmp_path / "mlp.onnx", hidden=128, inputs=64)


def run_cli(*args: str) -> int:
    return main([*map(str, args), "-q"])


def files_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("model.onnx")}


def dense_reference(original: Path, out: Path) -> onnx.ModelProto:
    """The original model with each quantized weight replaced by its decoded (dequantized) value."""
    reference = onnx.load(str(original))
    layouts = {layer["name"]: layer["op_type"] for layer in json.loads((out / "report.json").read_text())["layers"]}
    for name, w in dequantized_weights(out).items():
        for init in reference.graph.initializer:
            if init.name == name:
                transposed = layouts[name] == "Gemm"  # the test MLP's Gemm has transB=1
                init.CopyFrom(numpy_helper.from_array(w if transposed else w.T.copy(), init.name))
    return reference


@pytest.mark.parametrize("method", ["rtn", "kmeans-vq"])
def test_compiles_foreign_onnx_without_calibration(tmp_path, mlp, method):
    out = tmp_path / "out"
    assert run_cli(mlp, "--method", method, "--bits", "2", "-o", out, "--work-dir", tmp_path / "work") == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.onnx.data", "recipe.yaml", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["quantized_layers"] == 3
    # bits per weight are the bytes in the file
    stored = stored_vq_bytes(out / "model.onnx")
    assert report["summary"]["stored_bytes"] == stored
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert report["summary"]["bits_per_weight"] == pytest.approx(stored * 8 / report["summary"]["quantized_weights"])
    assert sum(n.domain == "mgvq" for n in proto.graph.node) == 3  # the custom op is the default
    x = np.random.default_rng(1).standard_normal((2, 8, 64)).astype(np.float32)
    (y,) = create_session(out / "model.onnx").run(None, {"x": x})
    reference = dense_reference(mlp, out)
    (y_ref,) = ort.InferenceSession(reference.SerializeToString()).run(None, {"x": x})
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 1e-5
    (y_fp,) = ort.InferenceSession(str(mlp)).run(None, {"x": x})
    assert not np.allclose(y, y_fp)  # it really was quantized


@pytest.mark.parametrize("flag", ["--portable", "--form=decomposed"])
def test_portable_output_runs_in_stock_ort(tmp_path, mlp, flag):
    assert run_cli(mlp, "--method", "kmeans-vq", flag, "-o", tmp_path / "p", "--no-resume") == 0
    proto = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert [o.domain for o in proto.opset_import] == [""]
    recipe = (tmp_path / "p" / "recipe.yaml").read_text()
    assert "form: decomposed" in recipe
    assert run_cli(mlp, "--method", "kmeans-vq", "-o", tmp_path / "c", "--no-resume") == 0
    x = np.random.default_rng(1).standard_normal((2, 8, 64)).astype(np.float32)
    (y_portable,) = ort.InferenceSession(str(tmp_path / "p" / "model.onnx")).run(None, {"x": x})
    (y_custom,) = create_session(tmp_path / "c" / "model.onnx").run(None, {"x": x})
    assert np.linalg.norm(y_portable - y_custom) / np.linalg.norm(y_custom) < 1e-5


def test_portable_overrides_a_given_recipe(tmp_path, mlp):
    recipe = tmp_path / "r.yaml"
    assert run_cli(mlp, "--method", "rtn", "--save-recipe", recipe) == 0
    assert "form: custom" in recipe.read_text()
    assert run_cli(mlp, "--recipe", recipe, "--portable", "-o", tmp_path / "p", "--no-resume") == 0
    assert "form: decomposed" in (tmp_path / "p" / "recipe.yaml").read_text()


def test_same_recipe_and_seed_give_identical_bytes(tmp_path, mlp):
    for name in ("a", "b"):
        assert run_cli(mlp, "--method", "kmeans-vq", "-o", tmp_path / name, "--seed", "3", "--no-resume") == 0
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "recipe.yaml").read_text() == (tmp_path / "b" / "recipe.yaml").read_text()
    assert run_cli(mlp, "--method", "kmeans-vq", "-o", tmp_path / "c", "--seed", "4", "--no-resume") == 0
    assert files_bytes(tmp_path / "a") != files_bytes(tmp_path / "c")


def test_saved_recipe_reproduces_the_run(tmp_path, mlp):
    recipe = tmp_path / "r.yaml"
    assert run_cli(mlp, "--method", "rtn", "--bits", "3", "--save-recipe", recipe) == 0
    assert run_cli(mlp, "--recipe", recipe, "-o", tmp_path / "a", "--no-resume") == 0
    assert run_cli(mlp, "--method", "rtn", "--bits", "3", "-o", tmp_path / "b", "--no-resume") == 0
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")


def test_killed_run_resumes_and_ends_with_the_same_bytes(tmp_path, mlp, monkeypatch):
    import mgvq_compile.passes.quantize_kmeans_vq as kvq

    work = tmp_path / "work"
    assert run_cli(mlp, "--method", "kmeans-vq", "-o", tmp_path / "clean", "--no-resume") == 0
    real_kmeans = kvq.kmeans
    calls = []

    def dying_kmeans(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while quantizing the second layer
        return real_kmeans(*args, **kwargs)

    monkeypatch.setattr(kvq, "kmeans", dying_kmeans)
    assert run_cli(mlp, "--method", "kmeans-vq", "-o", tmp_path / "out", "--work-dir", work) == 130
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written output
    calls.clear()
    monkeypatch.setattr(kvq, "kmeans", lambda *a, **k: (calls.append(1), real_kmeans(*a, **k))[1])
    assert run_cli(mlp, "--method", "kmeans-vq", "-o", tmp_path / "out", "--work-dir", work) == 0
    assert len(calls) == 2  # the first layer came from its checkpoint
    assert files_bytes(tmp_path / "out") == files_bytes(tmp_path / "clean")
    calls.clear()
    assert run_cli(mlp, "--method", "kmeans-vq", "-o", tmp_path / "again", "--work-dir", work) == 0
    assert calls == []  # the whole pass was resumed
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert "quantize-kmeans-vq" in report["resumed_passes"]
    assert files_bytes(tmp_path / "again") == files_bytes(tmp_path / "clean")


def test_missing_model_file(tmp_path, capsys):
    assert run_cli(tmp_path / "nope.onnx", "-o", tmp_path / "out") == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_corrupt_model_file(tmp_path, mlp, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(mlp.read_bytes()[: 200] + b"\xff\xfe garbage")
    assert run_cli(bad, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "not a readable ONNX model" in err and "hint" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,bits,message", [("kmeans-vq", "9", "supports 1, 2, 3, 4, 5, 6, 7, 8"), ("rtn", "9", "1 to 8"), ("rtn", "2.5", "whole number"), ("nope", "2", "unknown method")])
def test_bits_or_method_out_of_range(tmp_path, mlp, capsys, method, bits, message):
    assert run_cli(mlp, "--method", method, "--bits", bits, "-o", tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_directory_needs_overwrite(tmp_path, mlp, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run_cli(mlp, "-o", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli(mlp, "-o", out, "--overwrite", "--no-resume") == 0
    assert (out / "model.onnx").exists() and not (out / "keep.txt").exists()


def test_recipe_whose_requirements_are_unmet(tmp_path, mlp, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mgvq_recipe: 1\nmethod: broken\npasses:\n- pass: fuse-vq-gemm\n")
    assert run_cli(mlp, "--recipe", recipe, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "requires 'quantized'" in err and "quantize" not in err.split("hint")[0].replace("'quantized'", "")


def test_python_api_and_module_entry_point(tmp_path, mlp):
    result = mgvq_compile.compile(str(mlp), method="rtn", bits=4, output=tmp_path / "api", resume=False, progress=False)
    assert result.report["summary"]["index_bits_per_weight"] == 4.0
    proc = subprocess.run([sys.executable, "-m", "mgvq_compile", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--bits" in proc.stdout


def _mgvq_option_refusal(tmp_path, mlp, capsys, option: str) -> str:
    """Compile with mgvq and ``--set option``; assert it is refused and writes nothing; its stderr."""
    calib = tmp_path / "calib"
    calib.mkdir(exist_ok=True)
    np.savez(calib / "0.npz", x=np.ones((1, 4, 64), np.float32))
    assert run_cli(mlp, "--method", "mgvq", "--calib", calib, "--set", option, "-o", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


def test_compensate_refine_rounds_below_one_is_refused(tmp_path, mlp, capsys):
    err = _mgvq_option_refusal(tmp_path, mlp, capsys, "compensate.refine_rounds=0")
    assert "refine_rounds must be >= 1" in err and "refine_codebooks=false" in err


def test_unknown_distortion_model_is_refused(tmp_path, mlp, capsys):
    err = _mgvq_option_refusal(tmp_path, mlp, capsys, "assign-bits.distortion=gaussian")
    assert "unknown assign-bits distortion 'gaussian'" in err and "high-rate, compensated" in err
    err = _mgvq_option_refusal(tmp_path, mlp, capsys, "assign-bits.distortion_steps=[6.8,0.9]")
    assert "distortion_steps must all be > 1" in err
