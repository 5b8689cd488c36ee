import numpy as np
import torch

from mgvq_compile.algorithms.kmeans import assign_nearest, kmeans
from mgvq_compile.algorithms.rtn import rtn_quantize, uniform_levels
from mgvq_compile.algorithms.statistics import accumulate, new_statistics, proxy_loss


def test_rtn_error_shrinks_with_bits_and_codes_decode_exactly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    errors = []
    for bits in (2, 3, 4, 8):
        codes, scales = rtn_quantize(w, bits, 128)
        assert codes.min() >= 0 and codes.max() < (1 << bits)
        levels = uniform_levels(bits).astype(np.float32)[:, 0]
        deq = levels[codes] * np.repeat(scales.astype(np.float32), 128, axis=1)
        errors.append(np.linalg.norm(deq - w) / np.linalg.norm(w))
        # every weight is within half a step of its level
        step = np.repeat(scales.astype(np.float32), 128, axis=1)
        assert np.all(np.abs(deq - w) <= 0.5 * step * (1 + 1e-3) + 1e-6)
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def test_kmeans_finds_well_separated_clusters_and_is_seeded():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((8, 4)) * 10
    data = torch.from_numpy(np.concatenate([c + 0.01 * rng.standard_normal((200, 4)) for c in centers]))
    fitted = kmeans(data, 8, iterations=20, seed=3)
    assign = assign_nearest(data.double(), fitted.double())
    assert len(set(assign.tolist())) == 8
    err = ((fitted.double()[assign] - data) ** 2).sum(dim=1).mean()
    assert err < 1e-3
    assert torch.equal(fitted, kmeans(data, 8, iterations=20, seed=3))


def test_kmeans_with_more_centroids_than_vectors_is_exact():
    data = torch.randn(10, 4)
    fitted = kmeans(data, 16, iterations=5, seed=0)
    assert fitted.shape == (16, 4)
    assert torch.allclose(fitted[assign_nearest(data, fitted)], data)


def test_statistics_match_their_definitions():
    torch.manual_seed(0)
    x, g = torch.randn(50, 6), torch.randn(50, 3)
    stats = new_statistics(6, 3, gradients=True, full_output_hessian=True)
    accumulate(stats, x[:20], g[:20], {"text": torch.ones(20, dtype=torch.bool)})
    accumulate(stats, x[20:], g[20:], {"text": torch.ones(30, dtype=torch.bool)})
    assert torch.allclose(stats.h_x, x.T @ x, atol=1e-4)
    assert torch.allclose(stats.h_x_by_modality["text"], x.T @ x, atol=1e-4)
    assert torch.allclose(stats.gradient, g.T @ x, atol=1e-4)
    gsq, xsq = (g * g).sum(1), (x * x).sum(1)
    assert torch.allclose(stats.h_i, (x * gsq[:, None]).T @ x / gsq.sum(), atol=1e-4)
    assert torch.allclose(stats.h_o, (g * xsq[:, None]).T @ g / xsq.sum(), atol=1e-4)
    w = torch.randn(3, 6)
    assert proxy_loss(w, w, stats.h_x) == 0.0
    assert proxy_loss(w, torch.zeros_like(w), stats.h_x) == 1.0
