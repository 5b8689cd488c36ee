"""custom_ops/build.py names the tools it misses (the install hook, setup.py, fails with that message)."""

from __future__ import annotations

import pytest


def test_missing_compiler_is_named(build_script, monkeypatch, tmp_path):
    real_which = build_script.shutil.which
    monkeypatch.setattr(build_script.shutil, "which", lambda tool: None if tool == "g++" else real_which(tool))
    with pytest.raises(RuntimeError, match=r"missing on PATH: g\+\+ \(a C\+\+17 compiler; on Debian/Ubuntu: apt-get install g\+\+\)"):
        build_script.build(tmp_path / "lib.so", force=True)
    assert not (tmp_path / "lib.so").exists()


def test_header_tools_are_needed_only_until_the_headers_are_fetched(build_script, monkeypatch, tmp_path):
    monkeypatch.setattr(build_script.shutil, "which", lambda tool: None)
    monkeypatch.setattr(build_script, "HEADERS_DIR", tmp_path / "no-headers")
    assert build_script.missing_tools() == ["g++", "apt-get", "dpkg-deb"]
    with pytest.raises(RuntimeError) as info:
        build_script.build(tmp_path / "lib.so", force=True)
    message = str(info.value)
    assert "apt-get (downloads ORT's headers" in message and "--deb FILE" in message
    assert "dpkg-deb (unpacks" in message
    headers = tmp_path / "headers"
    headers.mkdir()
    for name in build_script.REQUIRED_HEADERS:
        (headers / name).write_text("")
    monkeypatch.setattr(build_script, "HEADERS_DIR", headers)
    assert build_script.missing_tools("clang++") == ["clang++"]


def test_an_up_to_date_library_is_not_rebuilt(build_script, ops_library, monkeypatch):
    if ops_library is None:
        pytest.skip("the library could not be built here")
    monkeypatch.setattr(build_script.shutil, "which", lambda tool: None)  # would fail if it tried
    assert str(build_script.build()) == str(build_script.LIBRARY)
