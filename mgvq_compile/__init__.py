"""mgvq-compile: a static-graph compiler that quantizes models to ~2 bits per weight with VQ."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "collect_statistics", "compile"]


def compile(*args, **kwargs):  # noqa: A001 - the product's public name
    """See :func:`mgvq_compile.api.compile` (imported lazily to keep ``import mgvq_compile`` light)."""
    from mgvq_compile.api import compile as _compile

    return _compile(*args, **kwargs)


def collect_statistics(*args, **kwargs):
    """See :func:`mgvq_compile.api.collect_statistics`."""
    from mgvq_compile.api import collect_statistics as _collect_statistics

    return _collect_statistics(*args, **kwargs)
