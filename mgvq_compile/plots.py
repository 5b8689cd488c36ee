"""PNG plots of a compile report: bits per layer and error per layer (``mgvq-compile --plots``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mgvq_compile.errors import MgvqError

__all__ = ["PLOT_FILES", "require_matplotlib", "write_plots"]

PLOT_FILES = ("bits_per_layer.png", "error_per_layer.png")


def require_matplotlib() -> None:
    """Fail before any work is done when plots are asked for but matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MgvqError("--plots needs matplotlib, which is not installed",
                        "pip install 'mgvq-compile[plots]' (or pip install matplotlib)") from exc


def _quantized_layers(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [layer for layer in report["layers"] if layer["quantized"]]


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write :data:`PLOT_FILES` into ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers = _quantized_layers(report)
    index = list(range(len(layers)))
    width = max(8.0, len(layers) * 0.06)
    paths = []

    fig, ax = plt.subplots(figsize=(width, 4))
    ax.bar(index, [layer["bits_per_weight"] for layer in layers], color="tab:blue", label="stored")
    ax.plot(index, [layer["index_bits_per_weight"] for layer in layers], "k.", markersize=3, label="indices only")
    ax.axhline(report["summary"]["bits_per_weight"], color="tab:red", linewidth=1, label="model average")
    ax.set(xlabel="layer (graph order)", ylabel="bits per weight", title=f"{report['method']}: bits per layer")
    ax.legend(loc="upper right")
    paths.append(_save(fig, directory / PLOT_FILES[0]))

    fig, ax = plt.subplots(figsize=(width, 4))
    ax.semilogy(index, [_positive(layer.get("relative_weight_error")) for layer in layers], ".-",
                label="relative weight error")
    ax.semilogy(index, [_positive(layer.get("proxy_loss")) for layer in layers], ".-", label="proxy loss (H_X)")
    if any(layer.get("proxy_loss_before_compensation") is not None for layer in layers):
        ax.semilogy(index, [_positive(layer.get("proxy_loss_before_compensation")) for layer in layers], ".:",
                    label="proxy loss before compensation")
    ax.set(xlabel="layer (graph order)", ylabel="error", title=f"{report['method']}: error per layer")
    ax.legend(loc="upper right")
    paths.append(_save(fig, directory / PLOT_FILES[1]))
    return paths


def _positive(value: float | None) -> float:
    return value if value is not None and value > 0 else float("nan")


def _save(fig, path: Path) -> Path:
    from matplotlib import pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: byte-identical reruns
    plt.close(fig)
    return path
