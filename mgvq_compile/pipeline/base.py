"""The pass protocol: a name, a frozen versioned config, required and provided artifacts, ``run``."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from mgvq_compile.errors import RecipeError

__all__ = ["PassConfig", "PassResult", "Pass", "register_pass", "pass_class", "registered_passes"]


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: frozen, typed fields; ``VERSION`` changes when a field's meaning does."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, pass_name: str = "") -> "PassConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RecipeError(
                f"pass {pass_name!r} has no option(s) {', '.join(unknown)}",
                f"its options are: {', '.join(sorted(fields)) or '(none)'}",
            )
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            values[name] = _coerce(value, hints[name], f"{pass_name}.{name}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"invalid options for pass {pass_name!r}: {exc}") from exc


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        (item_type, *_rest) = typing.get_args(hint)
        return tuple(_coerce(v, item_type, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise RecipeError(f"option {where} must be {hint.__name__}, got {value!r}")
    return value


@dataclasses.dataclass
class PassResult:
    """What a pass produced: artifacts (by name) and a small summary for logs and the report."""

    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


class Pass:
    """A compiler pass. Subclasses set the class attributes and implement :meth:`run`.

    ``rewrites_graph`` passes change the IR in place and always run; the others only produce
    artifacts, which the pass manager stores so that a re-run resumes instead of recomputing.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    rewrites_graph: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: PassConfig | None = None):
        self.config = config if config is not None else self.config_class()

    def describe(self) -> dict[str, Any]:
        return {"pass": self.name, "version": self.config.VERSION, **self.config.to_dict()}

    def run(self, ctx: Any) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    import mgvq_compile.passes  # noqa: F401  (registers the built-in passes)

    return dict(_REGISTRY)


def pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise RecipeError(f"unknown pass {name!r}", f"known passes: {', '.join(sorted(passes))}")
    return passes[name]
