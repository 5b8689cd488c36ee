"""Atomic writes of the text files the CLI, the demo and the benchmarks leave behind."""

from __future__ import annotations

import os

import pytest

from mgvq_compile import output
from mgvq_compile.output import write_text_atomic


def test_write_text_atomic_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "results" / "table.md"
    write_text_atomic(path, "first\n")
    write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert os.listdir(path.parent) == ["table.md"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old\n")

    def interrupted(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(output.os, "replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["report.json"]
