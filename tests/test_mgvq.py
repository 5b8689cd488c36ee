"""The mgvq recipe end to end on a small MLP: budget held with everything stored, and its ablations."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort

from mgvq_compile.cli import main
from onnx_builders import save_mlp
from test_calibrated_compile import write_calib


def run_cli(*args) -> int:
    return main([*map(str, args), "-q"])


def test_mgvq_holds_the_budget_and_runs_in_ort(tmp_path):
    mlp = save_mlp(tmp_path / "mlp.onnx", hidden=256, inputs=32 * 4, outputs=16)
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.savez(calib_dir / f"{i}.npz", x=rng.standard_normal((2, 8, 128)).astype(np.float32),
                 labels=rng.integers(0, 16, size=(2, 8)).astype(np.int64))
    reports = {}
    for method in ("mgvq", "mgvq-no-alloc", "mgvq-no-grad", "kmeans-vq"):
        out = tmp_path / method
        assert run_cli(mlp, "--method", method, "--bits", "2", "--calib", calib_dir, "-o", out,
                       "--work-dir", tmp_path / "work") == 0, method
        reports[method] = json.loads((out / "report.json").read_text())
        x = rng.standard_normal((2, 8, 128)).astype(np.float32)
        (y,) = ort.InferenceSession(str(out / "model.onnx")).run(None, {"x": x})
        assert np.isfinite(y).all()
    for method in ("mgvq", "mgvq-no-alloc", "mgvq-no-grad"):
        summary = reports[method]["summary"]
        assert summary["bits_per_weight"] <= 2.0, (method, summary)  # everything stored counts
        assert all(len(layer["bits"]) == 4 for layer in reports[method]["layers"])
    assert len({tuple(layer["bits"]) for layer in reports["mgvq-no-alloc"]["layers"]}) == 1
