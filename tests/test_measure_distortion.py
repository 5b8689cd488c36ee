"""MeasureDistortion: the compile measures its own D(b) and the allocation prices widths with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgvq_compile.algorithms.statistics import accumulate, new_statistics, restrict_rows
from mgvq_compile.errors import RecipeError
from mgvq_compile.graph import LinearLayer
from mgvq_compile.passes.compensate import CompensateConfig
from mgvq_compile.passes.fit_codebooks import FitCodebooksConfig
from mgvq_compile.pipeline.manager import PassManager
from mgvq_compile.passes.measure_distortion import MeasureDistortionConfig, layer_losses_by_width, sample_layers
from mgvq_compile.recipes import builtin_recipe, recipe_from_dict
from test_mgvq import _compile_mgvq, _mlp_with_calibration, run_cli


# The measured loss model takes whole widths; d = 2 at every budget, so compiles at 2.5 and 3 bits share the curve.
WHOLE_WIDTHS_D2 = ("--set", "assign-bits.fractional_widths=false", "--set", "*.vector_dim=2")
MEASURED = ("--set", "assign-bits.distortion=measured", *WHOLE_WIDTHS_D2)


def _layer(key: str, n: int = 16) -> LinearLayer:
    return LinearLayer("model", key, key, "MatMul", False, 8, n, "x")


def test_sample_layers_spreads_over_roles_and_depth():
    blocks = [[_layer(f"block.{b}.attn"), _layer(f"block.{b}.mlp", n=7 if b == 3 else 16)] for b in range(10)]
    layers = [layer for block in blocks for layer in block]
    picked = [layer.key for layer in sample_layers(layers, 4, vector_dim=2)]
    # two picks per role: attn (role 0 of 2) at depth fractions 1/8, 5/8 of its 10 layers (positions 1, 6),
    # mlp (role 1) at 3/8, 7/8 of its 9 eligible ones (block 3's width 7 is not divisible by d=2): 3, 7
    assert picked == ["block.1.attn", "block.4.mlp", "block.6.attn", "block.8.mlp"]
    assert len(sample_layers(layers, 50, vector_dim=2)) == 19  # all eligible layers
    # more picks than a role has go to the other roles
    assert len(sample_layers(layers[:4] + [_layer("head")], 4, vector_dim=2)) == 4


def test_layer_loss_falls_with_every_bit():
    rng = np.random.default_rng(0)
    m, n = 32, 64
    weight = rng.standard_normal((m, n)).astype(np.float32)
    stats = new_statistics(n, m, gradients=False, full_output_hessian=False)
    mixing = torch.from_numpy(rng.standard_normal((n, n)).astype(np.float32)) / n ** 0.5
    accumulate(stats, torch.randn(512, n, generator=torch.Generator().manual_seed(1)) @ mixing)
    losses = layer_losses_by_width(weight, stats, (1, 2, 3, 4), 2, seed=0, fit=FitCodebooksConfig(),
                                   compensate=CompensateConfig())
    assert list(losses) == [1, 2, 3, 4]
    assert losses[1] > losses[2] > losses[3] > losses[4] > 0, losses
    assert losses == layer_losses_by_width(weight, stats, (1, 2, 3, 4), 2, seed=0, fit=FitCodebooksConfig(),
                                           compensate=CompensateConfig())  # seeded: identical
    subset = layer_losses_by_width(weight, stats, (1, 2), 2, seed=0, fit=FitCodebooksConfig(),
                                   compensate=CompensateConfig(), rows=16)
    assert subset[1] > subset[2] > 0 and subset != {b: losses[b] for b in (1, 2)}  # another (half) layer


def test_restrict_rows_keeps_the_input_statistics():
    m, n = 6, 4
    stats = new_statistics(n, m, gradients=True, full_output_hessian=True)
    g = torch.randn(10, m, generator=torch.Generator().manual_seed(0))
    accumulate(stats, torch.randn(10, n, generator=torch.Generator().manual_seed(1)), g)
    rows = torch.tensor([1, 4])
    part = restrict_rows(stats, rows)
    assert torch.equal(part.h_x, stats.h_x) and torch.equal(part.h_i, stats.h_i)
    assert torch.equal(part.gradient, stats.gradient[rows]) and torch.equal(part.h_o, stats.h_o[rows][:, rows])


def test_mgvq_measures_its_curve_and_allocates_with_it(tmp_path):
    mlp, calib = _mlp_with_calibration(tmp_path)
    _out, measured = _compile_mgvq(tmp_path, mlp, calib, "measured", "--bits", "2.5", *MEASURED)
    curve = measured["distortion"]
    assert curve["widths"] == [1, 2, 3, 4] and len(curve["steps"]) == 3 and all(s > 1 for s in curve["steps"])
    assert set(curve["sampled_layers"]) == {layer["name"] for layer in measured["layers"]}  # 3 layers < 8: all
    # The same steps given by hand give the same allocation (the curve is all that changes D(b)).
    steps = "[" + ",".join(map(str, curve["steps"])) + "]"
    _out, given = _compile_mgvq(tmp_path, mlp, calib, "given", "--bits", "2.5", *WHOLE_WIDTHS_D2,
                                 "--set", f"assign-bits.distortion_steps={steps}")
    assert [layer["bits"] for layer in given["layers"]] == [layer["bits"] for layer in measured["layers"]]
    assert measured["summary"]["bits_per_weight"] <= 2.5
    # The curve does not depend on the budget: a 3-bit compile reuses it from the artifact cache.
    _out, three = _compile_mgvq(tmp_path, mlp, calib, "three", "--bits", "3", *MEASURED)
    assert three["distortion"] == curve and "measure-distortion" in three["resumed_passes"]


def test_asking_for_the_measured_model_adds_the_measuring_pass():
    recipe = builtin_recipe("mgvq", bits=2, calibrated=True)
    assert "measure-distortion" not in [p.name for p in recipe.passes]  # the default prices widths by 2^(-2b)
    measured = recipe.with_options({"assign-bits.distortion": "measured", "assign-bits.allowed_bits": [1, 2, 3],
                                    "measure-distortion.layers": 4})
    names = [p.name for p in measured.passes]
    assert names.index("measure-distortion") == names.index("assign-bits") - 1
    measure = measured.passes[names.index("measure-distortion")].config
    assert (measure.allowed_bits, measure.vector_dim, measure.layers) == ((1, 2, 3), 4, 4)  # assign-bits' d at 2 bits
    # at d = 4 (the 2-bit default) the pass measures assign-bits' own widths: 4 bits would be 16-bit codes
    whole = recipe.with_options({"assign-bits.distortion": "measured", "assign-bits.fractional_widths": False})
    measure = next(p.config for p in whole.passes if p.name == "measure-distortion")
    assert (measure.allowed_bits, measure.vector_dim) == ((1, 2, 3), 4)
    # a saved recipe keeps the pass explicitly; without the measured model its options are refused
    assert recipe_from_dict(measured.to_dict()).to_dict() == measured.to_dict()
    with pytest.raises(RecipeError, match="no pass 'measure-distortion'") as refused:
        recipe.with_options({"measure-distortion.layers": 4})
    assert "assign-bits.distortion=measured" in refused.value.hint


def test_measured_distortion_needs_the_pass_and_a_matching_vector_dim(tmp_path):
    recipe = builtin_recipe("mgvq", bits=2, calibrated=True).to_dict()
    next(p for p in recipe["passes"] if p["pass"] == "assign-bits").update(distortion="measured", fractional_widths=False)
    with pytest.raises(RecipeError, match="requires 'distortion_curve'") as refused:
        PassManager(list(recipe_from_dict(recipe).passes)).validate({"stats"})
    assert "provided by measure-distortion (not in the recipe)" in refused.value.hint
    mlp, calib = _mlp_with_calibration(tmp_path)
    out = tmp_path / "mismatch"
    assert run_cli(mlp, "--method", "mgvq", "--calib", calib, "-o", out, "--work-dir", tmp_path / "work",
                   *MEASURED, "--set", "measure-distortion.vector_dim=1") == 2
    assert not out.exists()
    with pytest.raises(RecipeError, match="two or more allowed widths"):
        MeasureDistortionConfig(allowed_bits=(2,))
