"""Recipes: a versioned list of pass configs, as YAML/JSON, and the built-in recipe of each method."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mgvq_compile.errors import CalibrationError, RecipeError
from mgvq_compile.passes._common import vector_dim_for_budget
from mgvq_compile.pipeline.base import Pass, pass_class

__all__ = ["RECIPE_VERSION", "METHODS", "Recipe", "builtin_recipe", "load_recipe", "recipe_from_dict"]

RECIPE_VERSION = 1
MEASURE_PASS = "measure-distortion"

# Methods with a built-in recipe, and whether they need calibration data.
METHODS = {
    "rtn": False, "kmeans-vq": False, "gptq": True, "gptvq": True, "vlmq": True,
    "mgvq": True, "mgvq-no-alloc": True, "mgvq-no-grad": True,
}
GRADIENT_METHODS = ("vlmq", "mgvq", "mgvq-no-alloc", "mgvq-no-grad")


@dataclasses.dataclass(frozen=True)
class Recipe:
    method: str
    passes: tuple[Pass, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mgvq_recipe": RECIPE_VERSION,
            "method": self.method,
            "passes": [p.describe() for p in self.passes],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)

    def with_options(self, options: Mapping[str, Any]) -> "Recipe":
        """This recipe with pass options replaced, keyed ``"pass-name.option"`` (e.g. ``compensate.lam``);
        ``"*.option"`` sets the option in every pass that has it (e.g. ``*.vector_dim``)."""
        # measure-distortion's own options apply after the pass is added for assign-bits.distortion=measured.
        measure_options = {k: v for k, v in options.items() if k.startswith(MEASURE_PASS + ".")}
        others = {k: v for k, v in options.items() if k not in measure_options}
        recipe = self._with_pass_options(others).with_measured_distortion()
        return recipe._with_pass_options(measure_options) if measure_options else recipe

    def _with_pass_options(self, options: Mapping[str, Any]) -> "Recipe":
        names = [p.name for p in self.passes]
        by_pass: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            pass_name, _, option = key.partition(".")
            if not option:
                raise RecipeError(f"option {key!r} does not name a pass", "write it as PASS.OPTION, e.g. compensate.lam")
            if pass_name == "*":
                targets = [p.name for p in self.passes if option in {f.name for f in dataclasses.fields(p.config)}]
                if not targets:
                    raise RecipeError(f"no pass of recipe {self.method!r} has an option {option!r}")
            elif pass_name not in names:
                hint = f"its passes are: {', '.join(names)}"
                if pass_name == MEASURE_PASS:
                    hint += f"; {MEASURE_PASS} comes with --set assign-bits.distortion=measured"
                raise RecipeError(f"recipe {self.method!r} has no pass {pass_name!r}", hint)
            else:
                targets = [pass_name]
            for target in targets:
                by_pass.setdefault(target, {})[option] = value
        passes = []
        for p in self.passes:
            if p.name in by_pass:
                merged = {**p.config.to_dict(), **by_pass[p.name]}
                p = type(p)(type(p.config).from_dict(merged, pass_name=p.name))
            passes.append(p)
        return Recipe(self.method, tuple(passes))

    def with_measured_distortion(self) -> "Recipe":
        """This recipe with a measure-distortion pass before each assign-bits that asks for the measured
        loss model and has none before it, sampling the widths and vector dimension it allocates."""
        passes: list[Pass] = []
        for p in self.passes:
            measured_before = any(q.name == MEASURE_PASS for q in passes)
            if p.name == "assign-bits" and "distortion_curve" in p.requires and not measured_before:
                # With assign-bits' default widths (near the budget) at d <= 2 the pass keeps its own (1-4
                # bits), so compiles at other budgets share the measurement; at d = 4 a 4-bit width would
                # be 16-bit codes (65536 codewords), so it measures assign-bits' own widths.
                own = p.config.allowed_bits or p.config.dim > 2
                widths = {"allowed_bits": p.config.widths} if own else {}
                passes.append(_make(MEASURE_PASS, vector_dim=p.config.dim, **widths))
            passes.append(p)
        return Recipe(self.method, tuple(passes))


def _make(name: str, **options: Any) -> Pass:
    cls = pass_class(name)
    return cls(cls.config_class.from_dict(options, pass_name=name))


def _integer_bits(method: str, bits: float) -> int:
    if float(bits) != int(bits):
        raise RecipeError(
            f"method {method!r} takes a whole number of bits per weight, got {bits}",
            "pass an integer --bits (fractional budgets come with mixed-precision methods)",
        )
    return int(bits)


def builtin_recipe(method: str, *, bits: float, calibrated: bool, portable: bool = False) -> Recipe:
    """The recipe a method name stands for. With calibration data, statistics are collected (rtn and
    kmeans-vq use them only for the report's proxy loss; vlmq also collects gradients, for H_I).
    ``portable``: end with standard ONNX ops that stock ORT runs, not ``mgvq.VQGemm`` nodes."""
    fuse = _make("fuse-vq-gemm", form="decomposed" if portable else "custom")
    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}", f"available methods: {', '.join(METHODS)}")
    if METHODS[method] and not calibrated:
        raise CalibrationError(
            f"method {method!r} needs calibration data", "pass --calib DIR (a directory of .npz feeds)"
        )
    passes = []
    if calibrated:
        options = {"gradients": method in GRADIENT_METHODS}
        if method.startswith("mgvq"):
            # H_I without token importance (H_X / T); gradients still give H_O and the Fisher trace. Seed 0,
            # 2 bits: Whisper NLL 6.70 vs 7.16 with importance, SmolLM2 perplexity 203 vs 187.
            options["token_importance"] = False
        passes.append(_make("collect-stats", **options))
    if method.startswith("mgvq"):
        passes += [
            # mgvq-no-alloc is module 2 alone: no channel groups (one per layer, no permutation), as gptvq,
            # whatever group count the defaults give d.
            _make("assign-bits", bits=float(bits),
                  **({"uniform": True, "groups": 1} if method == "mgvq-no-alloc" else {})),
            _make("fit-codebooks"),
            _make("compensate", **({"lam": 0.0} if method == "mgvq-no-grad" else {})),
            fuse,
        ]
        return Recipe(method, tuple(passes))
    b = _integer_bits(method, bits)
    if method == "rtn":
        passes.append(_make("quantize-rtn", bits=b))
    elif method == "kmeans-vq":
        passes.append(_make("quantize-kmeans-vq", bits=b))
    elif method == "gptq":
        passes.append(_make("quantize-gptq", bits=b))
    elif method == "vlmq":
        passes.append(_make("quantize-gptq", bits=b, hessian="importance"))
    else:
        passes.append(_make("quantize-gptvq", bits=b, vector_dim=vector_dim_for_budget(b)))
    passes.append(fuse)
    return Recipe(method, tuple(passes))


def recipe_from_dict(data: Any, *, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict) or "passes" not in data:
        raise RecipeError(f"{source} is not a recipe", "a recipe is a mapping with 'mgvq_recipe', 'method' and 'passes'")
    version = data.get("mgvq_recipe", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError(f"{source} has recipe version {version}; this compiler reads version {RECIPE_VERSION}")
    passes = []
    for index, entry in enumerate(data["passes"]):
        if not isinstance(entry, dict) or "pass" not in entry:
            raise RecipeError(f"{source}: step {index + 1} has no 'pass' name")
        options = dict(entry)
        name = options.pop("pass")
        cls = pass_class(name)
        wanted = options.pop("version", cls.config_class.VERSION)
        if wanted != cls.config_class.VERSION:
            raise RecipeError(
                f"{source}: pass {name!r} is at config version {cls.config_class.VERSION}, the recipe asks for {wanted}",
                "re-save the recipe with this compiler (--save-recipe)",
            )
        passes.append(cls(cls.config_class.from_dict(options, pass_name=name)))
    return Recipe(str(data.get("method", "custom")), tuple(passes))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", "pass a YAML or JSON recipe (see --save-recipe)")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"recipe {path} cannot be parsed: {exc}") from exc
    return recipe_from_dict(data, source=str(path))
