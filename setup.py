"""Setuptools hooks (the metadata is in pyproject.toml): build the custom-op libraries on every install.

``pip install -e .`` builds ``build/libmgvq_ops.so`` in the checkout, where
``mgvq_compile.runtime.library_path`` finds it; a wheel (``pip wheel .``, ``python -m build``) carries
it as ``mgvq_compile/lib/libmgvq_ops.so``. Both run ``custom_ops/build.py``'s ``build()`` (and its
``build_cuda()`` where that exists; it returns None without nvcc). A failed build fails the install.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.dist import Distribution
from setuptools.errors import ExecError

ROOT = Path(__file__).resolve().parent
BUILD_SCRIPT = ROOT / "custom_ops" / "build.py"
WHEEL_LIBRARY_DIR = Path("mgvq_compile") / "lib"  # mgvq_compile.runtime looks here in an installed package


def _load_build_script():
    spec = importlib.util.spec_from_file_location("mgvq_custom_ops_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _checked(step: str, function) -> Path | None:
    try:
        result = function()
    except subprocess.CalledProcessError as error:
        raise ExecError(
            f"{step} failed: {' '.join(map(str, error.cmd))} exited with {error.returncode} (its output is above); "
            f"fix that and reinstall, or run `python {BUILD_SCRIPT.relative_to(ROOT)}` to see it alone"
        ) from error
    except (RuntimeError, OSError) as error:
        raise ExecError(f"{step} failed: {error}") from error
    return None if result is None else Path(result)


def build_libraries() -> list[Path]:
    """Build the CPU library (required) and the CUDA one where the build script can (optional)."""
    script = _load_build_script()
    libraries = [_checked("building the mgvq CPU custom-op library", script.build)]
    build_cuda = getattr(script, "build_cuda", None)  # hook for the CUDA kernels
    if build_cuda is not None:
        cuda = _checked("building the mgvq CUDA custom-op library", build_cuda)
        if cuda is not None:
            libraries.append(cuda)
    return libraries


class BuildOps(Command):
    """``build`` sub-command: compile the libraries; outside editable installs, put them in the package."""

    description = "build the mgvq custom-op libraries for ONNX Runtime (custom_ops/build.py)"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False  # set by setuptools' editable_wheel (PEP 660)
        self.outputs: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self) -> None:
        libraries = build_libraries()
        self.announce(f"mgvq custom-op libraries: {', '.join(map(str, libraries))}", level=logging.INFO)
        if self.editable_mode:
            return  # the checkout's build/ is where runtime.library_path looks for them
        target = Path(self.build_lib) / WHEEL_LIBRARY_DIR
        self.mkpath(str(target))
        for library in libraries:
            self.copy_file(str(library), str(target / library.name))
            self.outputs.append(str(target / library.name))

    def get_outputs(self) -> list[str]:
        return list(self.outputs)


class Build(build):
    sub_commands = build.sub_commands + [("build_ops", None)]


class BinaryDistribution(Distribution):
    """The wheel carries a native library, so it is tagged for this platform, not ``py3-none-any``."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build": Build, "build_ops": BuildOps}, distclass=BinaryDistribution)
