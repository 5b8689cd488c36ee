import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep each test's resumable artifacts out of the user's cache."""
    monkeypatch.setenv("MGVQ_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
