import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def build_script():
    """custom_ops/build.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("mgvq_custom_ops_build", ROOT / "custom_ops" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def ops_library(build_script) -> str | None:
    """The CPU custom-op library, built once per session (a no-op when up to date) and pointed to by
    $MGVQ_OPS_LIBRARY, so every compiled model (mgvq.VQGemm nodes) opens through create_session.
    None when it cannot be built here: tests that run compiled models then fail with the build hint."""
    from mgvq_compile import runtime

    try:
        path = str(build_script.build())
    except Exception as error:  # noqa: BLE001 - reported by the tests that need the library
        logger.warning("mgvq custom-op library could not be built: %s", error)
        yield None
        return
    previous = os.environ.get(runtime.LIBRARY_ENV)
    os.environ[runtime.LIBRARY_ENV] = path
    yield path
    if previous is None:
        os.environ.pop(runtime.LIBRARY_ENV, None)
    else:
        os.environ[runtime.LIBRARY_ENV] = previous


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep each test's resumable artifacts out of the user's cache."""
    monkeypatch.setenv("MGVQ_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
