"""Statistics of the calibration gradient (is it signal or noise?) and the API that collects them."""

from __future__ import annotations

import json

import pytest
import torch

from mgvq_compile.algorithms.gptq import newton_step
from mgvq_compile.algorithms.statistics import (
    accumulate,
    first_order_transfer,
    gradient_cosine,
    gradient_signal_ratio,
    new_statistics,
)
from mgvq_compile import collect_statistics
from mgvq_compile.api import compile
from mgvq_compile.errors import CalibrationError, RecipeError
from mgvq_compile.passes.compensate import CompensateConfig
from onnx_builders import save_mlp
from test_calibrated_compile import write_calib


def _stats(tokens: int, seed: int, *, shared_direction: bool, n: int = 24, m: int = 12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen)
    g = torch.randn(tokens, m, generator=gen)
    if shared_direction:
        # Every token pushes the loss the same way: g_t = u (x_t . v) + noise, so E[g_t x_t^T] = u v^T.
        u = torch.linspace(1.0, 2.0, m)
        v = torch.linspace(-1.0, 1.0, n)
        g = 0.2 * g + (x @ v)[:, None] * u[None, :]
    stats = new_statistics(n, m, gradients=True, full_output_hessian=True)
    accumulate(stats, x, g)
    return stats


def test_cross_moment_is_weighted_like_the_input_hessian():
    gen = torch.Generator().manual_seed(2)
    x, x_ref, g = torch.randn(50, 6, generator=gen), torch.randn(50, 6, generator=gen), torch.randn(50, 4, generator=gen)
    stats = new_statistics(6, 4, gradients=True, full_output_hessian=True)
    accumulate(stats, x[:20], g[:20], x_reference=x_ref[:20])
    accumulate(stats, x[20:], g[20:], x_reference=x_ref[20:])
    weights = (g * g).sum(dim=1)
    expected = (x_ref * weights[:, None]).T @ x / weights.sum()
    assert torch.allclose(stats.input_cross_moment, expected, rtol=1e-5, atol=1e-6)
    same = new_statistics(6, 4, gradients=True, full_output_hessian=True)
    accumulate(same, x, g, x_reference=x)
    assert torch.allclose(same.input_cross_moment, same.input_hessian)  # C = H when the inputs agree
    plain = new_statistics(6, 4, gradients=False, full_output_hessian=True)
    accumulate(plain, x, x_reference=x_ref)
    assert torch.allclose(plain.input_cross_moment, x_ref.T @ x, rtol=1e-5, atol=1e-5)
    assert new_statistics(6, 4, gradients=False, full_output_hessian=True).input_cross_moment is None
    with pytest.raises(ValueError, match="reference inputs"):
        accumulate(plain, x, x_reference=x_ref[:, :5])


def test_signal_ratio_is_about_one_for_noise_and_grows_with_tokens_for_a_shared_direction():
    noise = [gradient_signal_ratio(_stats(4000, seed, shared_direction=False)) for seed in range(5)]
    assert 0.8 < sum(noise) / len(noise) < 1.2
    few, many = (gradient_signal_ratio(_stats(t, 0, shared_direction=True)) for t in (500, 4000))
    assert few > 20.0 and many > 5.0 * few


def test_cosine_of_gradients():
    a = _stats(2000, 1, shared_direction=True).gradient
    b = _stats(2000, 2, shared_direction=True).gradient
    assert gradient_cosine(a, a) == pytest.approx(1.0)
    assert gradient_cosine(a, -2.0 * a) == pytest.approx(-1.0)
    assert gradient_cosine(a, b) > 0.95
    noise_a = _stats(2000, 1, shared_direction=False).gradient
    noise_b = _stats(2000, 2, shared_direction=False).gradient
    assert abs(gradient_cosine(noise_a, noise_b)) < 0.2
    assert gradient_cosine(a, torch.zeros_like(a)) != gradient_cosine(a, torch.zeros_like(a))  # nan


def test_first_order_transfer_of_the_newton_direction():
    calib = _stats(3000, 1, shared_direction=True)
    step = newton_step(calib.gradient, calib.h_i, calib.h_o)
    # The same gradient per token (another token count) transfers fully; a negated one reverses.
    assert first_order_transfer(step, calib.gradient, calib.tokens, 3.0 * calib.gradient, 3 * calib.tokens) == pytest.approx(1.0)
    assert first_order_transfer(step, calib.gradient, calib.tokens, -calib.gradient, calib.tokens) == pytest.approx(-1.0)
    heldout = _stats(3000, 2, shared_direction=True)
    assert 0.8 < first_order_transfer(step, calib.gradient, calib.tokens, heldout.gradient, heldout.tokens) < 1.2
    noisy = _stats(3000, 1, shared_direction=False)
    noisy_step = newton_step(noisy.gradient, noisy.h_i, noisy.h_o)
    other = _stats(3000, 2, shared_direction=False)
    assert abs(first_order_transfer(noisy_step, noisy.gradient, noisy.tokens, other.gradient, other.tokens)) < 0.3


def test_collect_statistics_shares_the_compile_cache(tmp_path):
    mlp = save_mlp(tmp_path / "mlp.onnx", hidden=64, inputs=32, outputs=16)
    calib = write_calib(tmp_path / "calib")
    work = tmp_path / "work"
    stats = collect_statistics(mlp, calib=calib, work_dir=work, progress=False)
    assert len(stats) == 3  # the MLP's three linear layers
    for layer in stats.values():
        assert layer.gradient is not None and layer.tokens == 3 * 2 * 8
        assert float(layer.gradient.abs().sum()) > 0.0 and layer.fisher_trace > 0.0
    again = collect_statistics(mlp, calib=calib, work_dir=work, progress=False)
    assert all(torch.equal(again[k].gradient, stats[k].gradient) for k in stats)
    result = compile(mlp, method="mgvq", calib=calib, output=tmp_path / "out", work_dir=work, progress=False)
    assert "collect-stats" in json.loads((tmp_path / "out" / "report.json").read_text())["resumed_passes"]
    assert result.report["resumed_passes"][0] == "collect-stats"


def test_collect_statistics_needs_calibration(tmp_path):
    mlp = save_mlp(tmp_path / "mlp.onnx", hidden=64, inputs=32, outputs=16)
    with pytest.raises(CalibrationError, match="--calib"):
        collect_statistics(mlp, calib=None, work_dir=tmp_path / "work", progress=False)


def test_heavy_newton_damping_moves_along_the_gradient_and_bad_damping_is_refused():
    stats = _stats(3000, 1, shared_direction=True)
    light = newton_step(stats.gradient, stats.h_i, stats.h_o, damp_rel=0.01)
    heavy = newton_step(stats.gradient, stats.h_i, stats.h_o, damp_rel=1e4)
    assert gradient_cosine(heavy, stats.gradient) > 0.999
    assert gradient_cosine(light, stats.gradient) < gradient_cosine(heavy, stats.gradient)
    with pytest.raises(RecipeError, match="newton_damp_rel"):
        CompensateConfig(newton_damp_rel=0.0)
