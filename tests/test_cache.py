"""The artifact cache: listing, pruning least recently used first, and the CLI around it."""

from __future__ import annotations

import os
import time

import pytest

import mgvq_compile
from mgvq_compile.cache import IN_USE_S, cache_entries, parse_age, parse_size, prune_cache
from mgvq_compile.cli import main
from onnx_builders import save_mlp

NOW = time.time()
DAY = 86400.0


def make_entry(work, run, step, nbytes, age_s, partial=False):
    path = work / run / (step + (".partial" if partial else ""))
    path.mkdir(parents=True)
    data = path / ("layer-0.pt" if partial else "artifacts.pt")
    data.write_bytes(b"x" * nbytes)
    stamp = NOW - age_s
    os.utime(data, (stamp, stamp))
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def cache(tmp_path):
    work = tmp_path / "cache"
    paths = {
        "old": make_entry(work, "run-a", "00-collect-stats-1", 4000, 40 * DAY),
        "mid": make_entry(work, "run-a", "01-assign-bits-2", 3000, 10 * DAY),
        "new": make_entry(work, "run-b", "00-collect-stats-3", 2000, 1 * DAY),
        "cut": make_entry(work, "run-b", "01-compensate-4", 500, 2 * DAY, partial=True),
        "busy": make_entry(work, "run-c", "00-collect-stats-5", 1000, IN_USE_S / 2),
    }
    return work, paths


def test_entries_are_listed_least_recently_used_first(cache):
    work, paths = cache
    entries = cache_entries(work)
    assert [e.path for e in entries] == [paths[k] for k in ("old", "mid", "cut", "new", "busy")]
    assert [e.nbytes for e in entries] == [4000, 3000, 500, 2000, 1000]
    assert [e.partial for e in entries] == [False, False, True, False, False]
    assert cache_entries(work / "missing") == []


def test_prune_to_a_size_removes_the_least_recently_used(cache):
    work, paths = cache
    removed = prune_cache(work, max_bytes=3000, now=NOW)
    assert [e.path for e in removed] == [paths["old"], paths["mid"], paths["cut"]]
    assert not (work / "run-a").exists()  # emptied run directories go too
    assert [e.path for e in cache_entries(work)] == [paths["new"], paths["busy"]]


def test_prune_by_age_and_dry_run(cache):
    work, paths = cache
    would = prune_cache(work, older_than_s=5 * DAY, now=NOW, dry_run=True)
    assert [e.path for e in would] == [paths["old"], paths["mid"]]
    assert len(cache_entries(work)) == 5
    assert [e.path for e in prune_cache(work, older_than_s=5 * DAY, now=NOW)] == [paths["old"], paths["mid"]]
    assert len(cache_entries(work)) == 3


def test_entries_in_use_are_never_pruned(cache):
    work, paths = cache
    prune_cache(work, max_bytes=0, now=NOW)
    assert [e.path for e in cache_entries(work)] == [paths["busy"]]


def test_sizes_and_ages_parse():
    assert parse_size("20G") == 20 << 30
    assert parse_size("1.5MiB") == int(1.5 * (1 << 20))
    assert parse_size("0") == 0
    assert parse_age("30d") == 30 * DAY and parse_age("12h") == 12 * 3600
    for bad in ("3X", "-1G", "G"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("30", "soon", "-2d"):
        with pytest.raises(ValueError):
            parse_age(bad)


def test_cache_command(cache, capsys):
    work, paths = cache
    assert main(["cache", "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "10.3 KiB in 5 entries of 3 runs" in out and "(1 interrupted)" in out
    with pytest.raises(SystemExit):
        main(["cache", "--work-dir", str(work), "--prune"])
    assert "needs --max-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cache", "--work-dir", str(work), "--older-than", "30d"])
    assert "add --prune" in capsys.readouterr().err
    # Real times here (the command prunes against the clock): only the busy entry is recent.
    assert main(["cache", "--work-dir", str(work), "--prune", "--older-than", "1h"]) == 0
    assert "removed 4 entries" in capsys.readouterr().out
    assert [e.path for e in cache_entries(work)] == [paths["busy"]]


def test_resuming_marks_an_entry_used(tmp_path):
    model = save_mlp(tmp_path / "mlp.onnx")
    work = tmp_path / "cache"
    options = dict(method="rtn", bits=2, work_dir=work, overwrite=True, progress=False)
    mgvq_compile.compile(str(model), output=tmp_path / "a", **options)
    entries = cache_entries(work)
    assert entries, "the compile stored nothing to resume from"
    old = time.time() - 30 * DAY
    for entry in entries:
        for file in entry.path.iterdir():
            os.utime(file, (old, old))
    mgvq_compile.compile(str(model), output=tmp_path / "b", **options)
    assert all(time.time() - e.last_used < 3600 for e in cache_entries(work))
