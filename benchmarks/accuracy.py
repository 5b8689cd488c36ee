"""Accuracy of every method on the two real models, at the same total bits per weight.

    python benchmarks/accuracy.py [--models smollm2 whisper] [--methods ...] [--bits 2 3] [--seeds 0 1 2]
                                  [--set PASS.OPTION=VALUE ...] [--calib-samples N] [--tag NAME] [--work DIR] [--recorded-only]
                                  [--reuse TAG[:METHOD|:FROM=TO] ...]

- SmolLM2-135M: calibrate on windows of Pride and Prejudice, perplexity on Sense and Sensibility (ORT).
- Whisper tiny.en: calibrate on espeak-ng speech of Pride and Prejudice sentences; WER and teacher-forced
  NLL on speech of Sense and Sensibility sentences (ORT).

A seed picks the calibration samples and seeds every stochastic step of the compile. Each run is one
``mgvq-compile`` subprocess (its compile time and peak resident memory are recorded) and its result is
kept under ``--work``/runs, so an interrupted benchmark resumes where it stopped. A record measured on an
evaluation set of another size is evaluated again from its kept model files (no recompile). Writes
``benchmarks/results/accuracy{-TAG}.json`` and ``.md`` (mean and spread over seeds), and prints the table;
the runs such a file held that this invocation did not ask for (other models, methods, bits or seeds) are
kept, so a tag run in several invocations keeps one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import shlex
import statistics
import hashlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mgvq_compile.output import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_WORK = ROOT / "benchmarks" / "work" / "accuracy"
ALL_METHODS = ("rtn", "gptq", "vlmq", "gptvq", "mgvq-no-alloc", "mgvq-no-grad", "mgvq")
VQ_METHODS = ("kmeans-vq", "gptvq", "mgvq-no-alloc", "mgvq-no-grad", "mgvq")
# The methods whose allocation holds any budget (the others store whole widths plus their overheads).
BUDGETED_METHODS = ("mgvq-no-grad", "mgvq")
# WER split by kind of edit (they sum to the WER): a near-empty transcript scores about 1 in deletions,
# a transcript that loops to the token limit above 1 in insertions.
WER_PARTS = ("wer_substitutions", "wer_deletions", "wer_insertions")
CALIBRATION_NOVEL = "pride_and_prejudice"
EVALUATION_NOVEL = "sense_and_sensibility"

# Runs one compile in this interpreter and reports its peak resident memory on stderr.
_COMPILE_SNIPPET = (
    "import resource, sys; from mgvq_compile.cli import main; rc = main(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    seq_len: int = 128
    calib_windows: int = 32
    eval_windows: int = 32
    whisper_decoder_len: int = 48
    # The method page's 128 samples. 32 sentences (the default until 2026-11-23) hold 467 transcript tokens,
    # the only ones with a gradient, fewer than the 1536 inputs of the decoder's fc2; 128 hold 1881.
    # SmolLM2's 32 windows are 4096 tokens.
    whisper_calib_sentences: int = 128
    # 16 sentences (until 2026-11-24) hold about 230 reference words: one sentence that loops to the decode
    # limit moved a 2-bit model's WER by 0.1-0.2, as much as the spread over seeds.
    whisper_eval_sentences: int = 64

    def eval_samples(self, model: str) -> int:
        """The size of ``model``'s evaluation set: SmolLM2 windows, Whisper sentences."""
        return {"smollm2": self.eval_windows, "whisper": self.whisper_eval_sentences}[model]


# The evaluation sizes of the records written before records named theirs (Whisper sentences, SmolLM2 windows).
EARLIER_EVAL_SAMPLES = {"whisper": 16, "smollm2": 32}


@dataclasses.dataclass
class ModelSetup:
    fp_path: Path
    calib_dir: Path
    evaluate: Callable[[Path], dict]  # model.onnx -> metrics
    primary: str  # the metric the table leads with
    eval_samples: int | None = None  # the evaluation set's size: SmolLM2 windows, Whisper sentences


def _novel_suffix(novel: str) -> str:
    return "" if novel == CALIBRATION_NOVEL else f"-{novel}"


def smollm2_float_path(work: Path, s: Settings) -> Path:
    """The float SmolLM2 graph the benchmark compiles and evaluates."""
    return work / f"smollm2-fp32-seq{s.seq_len}" / "model.onnx"


def _smollm2(work: Path, seed: int, s: Settings, calib_novel: str = CALIBRATION_NOVEL) -> ModelSetup:
    from mgvq_compile.calibration.data import read_novel, write_text_calibration
    from mgvq_compile.models.smollm2 import export_causal_lm_onnx, load_smollm2

    fp_path = smollm2_float_path(work, s)
    calib_dir = work / f"smollm2-calib-{s.calib_windows}x{s.seq_len}-seed{seed}{_novel_suffix(calib_novel)}"
    model, tokenizer = load_smollm2()
    if not fp_path.exists():
        fp_path.parent.mkdir(parents=True, exist_ok=True)
        export_causal_lm_onnx(model, fp_path, seq_len=s.seq_len)
    if not calib_dir.exists():
        write_text_calibration(calib_dir, tokenizer, read_novel(calib_novel), seq_len=s.seq_len,
                               n_samples=s.calib_windows, seed=seed)
    return ModelSetup(fp_path, calib_dir, smollm2_evaluator(tokenizer, s), "perplexity", s.eval_samples("smollm2"))


def smollm2_evaluator(tokenizer, s: Settings) -> Callable[[Path], dict]:
    """model.onnx -> {"perplexity": ...} on the evaluation novel's windows."""
    from mgvq_compile.calibration.data import read_novel
    from mgvq_compile.evaluate import perplexity_ort

    text = read_novel(EVALUATION_NOVEL)

    def evaluate(path: Path) -> dict:
        return {"perplexity": perplexity_ort(path, tokenizer, text, seq_len=s.seq_len, max_windows=s.eval_windows)}

    return evaluate


def whisper_float_path(work: Path, s: Settings) -> Path:
    """The float Whisper graph the benchmark compiles and evaluates."""
    return work / f"whisper-fp32-dec{s.whisper_decoder_len}" / "model.onnx"


def _whisper(work: Path, seed: int, s: Settings, calib_novel: str = CALIBRATION_NOVEL) -> ModelSetup:
    from mgvq_compile.calibration.data import novel_sentences, read_novel, write_speech_calibration
    from mgvq_compile.models.whisper_ct2 import export_whisper_onnx, load_whisper_tiny_en, whisper_feature_extractor

    fp_path = whisper_float_path(work, s)
    calib_dir = work / f"whisper-calib-{s.whisper_calib_sentences}-seed{seed}{_novel_suffix(calib_novel)}"
    model, tokenizer = load_whisper_tiny_en()
    if not fp_path.exists():
        fp_path.parent.mkdir(parents=True, exist_ok=True)
        export_whisper_onnx(model, fp_path, decoder_len=s.whisper_decoder_len)
    if not calib_dir.exists():
        sentences = novel_sentences(read_novel(calib_novel), s.whisper_calib_sentences, seed=seed)
        write_speech_calibration(calib_dir, whisper_feature_extractor(), tokenizer, sentences,
                                 decoder_len=s.whisper_decoder_len)
    return ModelSetup(fp_path, calib_dir, whisper_evaluator(tokenizer, s), "wer", s.eval_samples("whisper"))


def whisper_evaluator(tokenizer, s: Settings) -> Callable[[Path], dict]:
    """model.onnx -> WER (and its parts), teacher-forced NLL, ... on the evaluation novel's sentences."""
    from mgvq_compile.calibration.data import novel_sentences, read_novel
    from mgvq_compile.evaluate import whisper_eval_ort

    references = novel_sentences(read_novel(EVALUATION_NOVEL), s.whisper_eval_sentences, seed=1234)

    def evaluate(path: Path) -> dict:
        result = whisper_eval_ort(path, tokenizer, references, decoder_len=s.whisper_decoder_len)
        return {k: result[k] for k in ("wer", *WER_PARTS, "nll", "unfinished_decodes", "hypothesis_words", "n_words")}

    return evaluate


MODELS = {"smollm2": _smollm2, "whisper": _whisper}


def _compile(setup: ModelSetup, out: Path, method: str, bits: float, seed: int, options: list[str],
             cache_dir: Path | None = None) -> dict:
    """One compile subprocess; ``cache_dir`` replaces the artifact cache (an empty one: nothing reused)."""
    cmd = [sys.executable, "-c", _COMPILE_SNIPPET, str(setup.fp_path), "-o", str(out), "--method", method,
           "--bits", f"{bits:g}", "--calib", str(setup.calib_dir), "--seed", str(seed), "--overwrite", "-q"]
    for option in options:
        cmd += ["--set", option]
    env = None if cache_dir is None else {**os.environ, "MGVQ_CACHE_DIR": str(cache_dir)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"compile failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-4000:]}")
    peak_kb = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    report = json.loads((out / "report.json").read_text())
    return {
        "compile_s": round(seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "bits_per_weight": report["summary"]["bits_per_weight"],
        "index_bits_per_weight": report["summary"]["index_bits_per_weight"],
        "files_mb": round(sum(report["summary"]["files"].get(f, 0) for f in report["summary"]["files"]
                              if f.startswith("model.onnx")) / 1e6, 1),
        "command": shlex.join(cmd[3:]),
        # Passes taken from the artifact cache: the float statistics as a rule; any later one means
        # compile_s did not time that pass (an interrupted run's work resumed).
        "resumed_passes": report.get("resumed_passes", []),
    }


UNTAGGED = "untagged"  # --reuse's name for the runs of no --tag (accuracy.json)


def run_key(model: str, method: str, bits: float, seed: int, tag: str) -> str:
    """The name of a run's record (under --work/runs) and model directory."""
    return f"{model}-{method}-{bits:g}bit-seed{seed}{'-' + tag if tag else ''}"


def _parse_reuse(source: str) -> tuple[str, str | None, str | None]:
    """``TAG``, ``TAG:METHOD`` or ``TAG:FROM=TO`` -> (tag, FROM, TO); see ``--reuse``."""
    tag, _, mapping = source.partition(":")
    from_method, equals, to_method = mapping.partition("=")
    to_method = to_method if equals else from_method
    if not tag or (mapping and not (from_method and to_method)):
        raise SystemExit(f"--reuse {source!r}: write TAG, TAG:METHOD or TAG:FROM_METHOD=TO_METHOD "
                         "(e.g. bits234:mgvq=mgvq-no-grad)")
    if not results_path(tag).is_file():
        raise SystemExit(f"--reuse {source!r}: no {results_path(tag)}; name a tag whose results are committed")
    return tag, from_method or None, to_method or None


def results_path(tag: str) -> Path:
    """A committed results file: ``accuracy-TAG.json``; the tag ``untagged`` names ``accuracy.json``."""
    return RESULTS / ("accuracy.json" if tag == UNTAGGED else f"accuracy-{tag}.json")


@functools.lru_cache(maxsize=None)
def _committed_runs(path: Path) -> tuple[dict, ...]:
    """The run records of a committed results file, read once per benchmark."""
    return tuple(json.loads(path.read_text())["runs"])


def calibration_of(record: dict) -> str | None:
    """The name of the calibration directory a run's compile read (None for fp32 references)."""
    args = shlex.split(record.get("command", ""))
    return Path(args[args.index("--calib") + 1]).name if "--calib" in args else None


def eval_samples_of(record: dict) -> int | None:
    """The size of the evaluation set a record was measured on."""
    return record.get("eval_samples", EARLIER_EVAL_SAMPLES.get(record["model"]))


def model_path_of(record: dict, setup: ModelSetup) -> Path:
    """The model.onnx a record measured: the float graph for fp32, else its compile's output directory."""
    if record["method"] == "fp32":
        return setup.fp_path
    args = shlex.split(record["command"])
    return Path(args[args.index("-o") + 1]) / "model.onnx"


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1))


def _on_evaluation_set(record: dict, record_path: Path, setup: ModelSetup | None, recorded_only: bool,
                       again: bool = False) -> dict:
    """``record`` measured on ``setup``'s evaluation set: a record measured on a set of another size (or
    any, ``again``) is evaluated again from its kept model files, its earlier metrics kept under
    ``earlier_evaluation`` (a record evaluated again on the same set keeps its earlier one)."""
    wanted, had = (None if setup is None else setup.eval_samples), eval_samples_of(record)
    if wanted is None or (had == wanted and not again):
        return record
    mismatch = f"{record_path} was evaluated on {had} samples, but this benchmark evaluates on {wanted}"
    if recorded_only:
        raise SystemExit(f"{mismatch}: run without --recorded-only to evaluate its model again")
    path = model_path_of(record, setup)
    if not path.is_file():
        raise SystemExit(f"{mismatch}, and its model {path} is gone: delete the record to compute it again")
    # Evaluated again on the same set, a record keeps its measurement on the other set, not this one twice.
    earlier = record.get("earlier_evaluation") if had == wanted else None
    if earlier is None:
        earlier = {"eval_samples": had,
                   **{k: record[k] for k in ("perplexity", "wer", *WER_PARTS, "nll", "unfinished_decodes") if k in record}}
    record = {**record, **setup.evaluate(path), "eval_samples": wanted, "earlier_evaluation": earlier}
    _write_record(record_path, record)
    return record


def reused_record(sources: list[str], model: str, method: str, bits: float, seed: int,
                  calibration: str | None = None) -> dict | None:
    """The first committed record of the ``--reuse`` sources that stands for this run, marked ``reused_from``;
    given a ``calibration`` directory name, only records calibrated on it."""
    for source in sources:
        tag, from_method, to_method = _parse_reuse(source)
        if to_method is not None and to_method != method:
            continue
        wanted = (model, from_method or method, bits, seed)
        for run in _committed_runs(results_path(tag)):
            if (run["model"], run["method"], run["bits"], run["seed"]) == wanted and (
                    calibration is None or calibration_of(run) == calibration):
                named = "no --tag" if tag == UNTAGGED else f"--tag {tag}"
                source_note = f"{named}, method {wanted[1]}"
                if "reused_from" in run:  # keep where the committed record itself came from
                    source_note += f" (there reused from {run['reused_from']})"
                return {**run, "method": method, "reused_from": source_note}
    return None


def _run_one(work: Path, setup: ModelSetup, model: str, method: str, bits: float, seed: int,
             options: list[str], tag: str, recorded_only: bool = False, reuse: list[str] = (),
             evaluate_again: bool = False, budget: float | None = None) -> dict | None:
    """One run's record: kept, reused or computed. ``budget``: compile at that many stored bits per weight
    instead of ``bits`` (recorded as ``budget_bits_per_weight``; the run stays named by ``bits``)."""
    key = run_key(model, method, bits, seed, tag)
    record_path = work / "runs" / f"{key}.json"
    calibration = None if setup is None else setup.calib_dir.name
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and calibration is not None and calibration_of(record) not in (None, calibration):
        raise SystemExit(f"{record_path} was calibrated on {calibration_of(record)}, but this run calibrates on "
                         f"{calibration}: pass another --tag (or --calib-samples), or delete the record to recompute it")
    if record is None or "reused_from" in record:
        # A kept copy of a reused run follows its committed source when that was measured anew (evaluated
        # again, say), unless only the copy is on today's evaluation set.
        reused = reused_record(list(reuse), model, method, bits, seed, calibration)
        if reused is not None and reused.get("budget_bits_per_weight") != budget:
            reused = None  # compiled at another budget: not the same run
        measured = lambda r: {k: v for k, v in r.items() if k != "reused_from"}  # noqa: E731
        if reused is not None and (record is None or measured(reused) != measured(record) and (
                setup is None or eval_samples_of(reused) == setup.eval_samples)):
            _write_record(record_path, reused)
            record = reused
    if record is not None and record.get("budget_bits_per_weight") != budget:
        raise SystemExit(f"{record_path} was compiled at a budget of {record.get('budget_bits_per_weight') or bits}, "
                         f"not {budget or bits}: pass another --tag, or delete the record to recompute it")
    if record is not None:
        return _on_evaluation_set(record, record_path, setup, recorded_only, evaluate_again)
    if recorded_only:
        return None
    out = work / "models" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "method": method, "bits": bits, "seed": seed, "options": options}
    if budget is not None:
        record["budget_bits_per_weight"] = budget
    record.update(_compile(setup, out, method, bits if budget is None else budget, seed, options))
    record.update(setup.evaluate(out / "model.onnx"), eval_samples=setup.eval_samples)
    _write_record(record_path, record)
    return record


def matched_budget(records: list[dict], model: str, method: str, bits: float, seed: int) -> float:
    """The stored bits per weight of ``method``'s run of (model, bits, seed) among ``records``, cut to 4
    decimals (never above it): the budget that puts an allocating method at the same total bits."""
    for record in records:
        if (record["model"], record["method"], record["bits"], record["seed"]) == (model, method, bits, seed):
            return math.floor(record["bits_per_weight"] * 10_000) / 10_000
    raise SystemExit(f"--same-bits-as {method}: no {method} run of {model} at {bits:g} bits, seed {seed}; "
                     f"list {method} before the methods it sets the budget of in --methods")


def _files_digest(model_path: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(model_path.parent.glob("model.onnx*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cold_record_path(work: Path, model: str, method: str, bits: float, seed: int, tag: str) -> Path:
    return work / "runs" / f"{run_key(model, method, bits, seed, tag)}-cold.json"


def _cold_compile(work: Path, setup: ModelSetup, model: str, method: str, bits: float, seed: int,
                  options: list[str], tag: str) -> dict:
    """``method`` compiled again with an empty artifact cache: the time a fresh user waits, calibration
    statistics included; its files must equal the cached run's byte for byte (determinism)."""
    key = run_key(model, method, bits, seed, tag)
    record_path = _cold_record_path(work, model, method, bits, seed, tag)
    if record_path.exists():
        return json.loads(record_path.read_text())
    out = work / "models" / f"{key}-cold"
    with tempfile.TemporaryDirectory(prefix="mgvq-cold-cache-") as cache:
        record = {"model": model, "method": method, "bits": bits, "seed": seed, "options": options,
                  **_compile(setup, out, method, bits, seed, options, cache_dir=Path(cache))}
    record["identical_to_cached_run"] = _files_digest(out / "model.onnx") == _files_digest(work / "models" / key / "model.onnx")
    _write_record(record_path, record)
    return record


COLD_COMPILE_TARGET_S = 15 * 60  # SmolLM2-135M, mgvq, 2 bits, this 2-core machine (issue 3)


def cold_compile_lines(cold: list[dict]) -> list[str]:
    lines = []
    for c in cold:
        verdict = "under" if c["compile_s"] < COLD_COMPILE_TARGET_S else "over"
        same = "yes" if c["identical_to_cached_run"] else "NO"
        lines.append(f"- Cold compile, {c['model']} {c['method']} {c['bits']:g}-bit seed {c['seed']} (empty artifact "
                     f"cache: calibration statistics included): {c['compile_s']:.0f} s = {c['compile_s'] / 60:.1f} min "
                     f"({verdict} the {COLD_COMPILE_TARGET_S // 60}-minute target), peak RSS {c['peak_rss_mb']:.0f} MB; "
                     f"files byte-identical to the cached run: {same}.")
    return lines


def _reference(work: Path, setup: ModelSetup, model: str, recorded_only: bool = False, again: bool = False) -> dict:
    path = work / "runs" / f"{model}-fp32.json"
    if path.exists():
        return _on_evaluation_set(json.loads(path.read_text()), path, setup, recorded_only, again)
    files = sorted(setup.fp_path.parent.glob("model.onnx*"))
    record = {"model": model, "method": "fp32", "bits": 32, "seed": None,
              "files_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1), **setup.evaluate(setup.fp_path),
              "eval_samples": setup.eval_samples}
    _write_record(path, record)
    return record


def merged_with_earlier(records: list[dict], path: Path, asked: set[tuple],
                        settings: Settings) -> tuple[list[dict], str | None]:
    """``records`` plus the runs of the results file ``path`` written before that this invocation did not
    ask for (``asked``: (model, method, bits, seed), fp32 references as (model, "fp32", 32, None)) and that
    were measured on today's evaluation sets, so a tag run in several invocations keeps one table; also
    the earlier file's command (None when nothing was kept)."""
    if not path.is_file():
        return records, None
    earlier = json.loads(path.read_text())
    kept = [r for r in earlier["runs"] if (r["model"], r["method"], r["bits"], r["seed"]) not in asked
            and eval_samples_of(r) == settings.eval_samples(r["model"])]
    if not kept:
        return records, None
    order = {name: i for i, name in enumerate(("fp32",) + ALL_METHODS)}
    models = list(dict.fromkeys(r["model"] for r in records + kept))
    merged = sorted(records + kept, key=lambda r: (
        models.index(r["model"]), r["method"] != "fp32", r["bits"], order.get(r["method"], len(order)), r["method"],
        -1 if r["seed"] is None else r["seed"]))
    return merged, earlier.get("command")


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


METRICS = ("perplexity", "log_perplexity", "wer", *WER_PARTS, "nll", "unfinished_decodes", "bits_per_weight", "compile_s",
           "peak_rss_mb", "files_mb")


def _metric(record: dict, metric: str) -> float | None:
    """A record's metric; log_perplexity (nats per token, ln of the perplexity) is derived: at 2 bits the
    perplexities of one method span orders of magnitude across seeds, so their spread is read in logs."""
    if metric == "log_perplexity":
        return math.log(record["perplexity"]) if record.get("perplexity") else None
    return record.get(metric)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, method, bits): metrics as mean/std over seeds, each only where every seed has it."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["method"], r["bits"]), []).append(r)
    rows = []
    for (model, method, bits), runs in groups.items():
        row = {"model": model, "method": method, "bits": bits, "seeds": [r["seed"] for r in runs]}
        for metric in METRICS:
            values = [_metric(r, metric) for r in runs]
            if None not in values:  # a mean over some of the seeds would read as one over all of them
                row[metric] = _spread(values)
        rows.append(row)
    return rows


def _cell(row: dict, metric: str, digits: int) -> str:
    if metric not in row:
        return ""
    v = row[metric]
    return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}" if len(v["values"]) > 1 else f"{v['mean']:.{digits}f}"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        metrics = ([("perplexity", 2), ("log_perplexity", 3)] if model == "smollm2"
                   else [("wer", 3), *((part, 3) for part in WER_PARTS), ("nll", 3), ("unfinished_decodes", 1)])
        names = [m for m, _ in metrics]
        lines += [f"### {model}", "",
                  "| method | bits | seeds | " + " | ".join(names) + " | stored bits/weight | files MB | compile s | peak RSS MB |",
                  "|---" * (7 + len(names)) + "|"]
        for r in (r for r in rows if r["model"] == model):
            cells = [_cell(r, m, d) for m, d in metrics]
            lines.append(f"| {r['method']} | {r['bits']:g} | {len(r['seeds'])} | " + " | ".join(cells)
                         + f" | {_cell(r, 'bits_per_weight', 3)} | {_cell(r, 'files_mb', 1)} | "
                         f"{_cell(r, 'compile_s', 0)} | {_cell(r, 'peak_rss_mb', 0)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["smollm2", "whisper"])
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    parser.add_argument("--bits", nargs="+", type=float, default=[2.0, 3.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], dest="options", metavar="PASS.OPTION=VALUE",
                        help="pass option for every mgvq-family run (e.g. compensate.lam=0.1)")
    parser.add_argument("--vector-dim", type=int, help="vector dimension d of every VQ method (gptvq, kmeans-vq, mgvq*)")
    parser.add_argument("--calib-samples", type=int, metavar="N",
                        help="calibration samples per seed for both models (SmolLM2 windows, Whisper sentences); "
                             f"default {Settings.calib_windows} and {Settings.whisper_calib_sentences}")
    parser.add_argument("--tag", default="", help="names this variant's runs and result files")
    parser.add_argument("--cold", default="mgvq", metavar="METHOD",
                        help="compile METHOD once more per model with an empty artifact cache, timing a fresh "
                             "user's compile (first bits and seed; 'none' skips it)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--recorded-only", action="store_true",
                        help="tabulate the runs already recorded under --work and run nothing new")
    parser.add_argument("--evaluate-again", action="store_true",
                        help="measure the recorded runs again from their kept model files (no recompile), "
                             "keeping the earlier metrics in each record's earlier_evaluation")
    parser.add_argument("--reuse", action="append", default=[], metavar="TAG[:METHOD|:FROM=TO]",
                        help="take a run missing from --work from the committed benchmarks/results/accuracy-TAG.json "
                             f"({UNTAGGED}: accuracy.json) instead of computing it (marked reused_from), if it read the "
                             "same calibration directory; :METHOD takes only that method's runs, "
                             ":FROM=TO lets that file's method FROM stand for method TO. Only for runs of the identical "
                             "configuration; repeatable, first match wins")
    parser.add_argument("--same-bits-as", metavar="METHOD",
                        help=f"compile {' and '.join(BUDGETED_METHODS)} at the stored bits per weight of METHOD's run "
                             "of the same model, bits and seed (e.g. gptvq, whose codebooks come on top of its whole "
                             "index bits), instead of at --bits: every VQ row at the same total bits")
    args = parser.parse_args(argv)
    if args.same_bits_as:
        if args.same_bits_as not in args.methods or args.same_bits_as in BUDGETED_METHODS:
            parser.error(f"--same-bits-as {args.same_bits_as}: name a method of --methods whose widths are fixed "
                         f"(not {' or '.join(BUDGETED_METHODS)})")
        args.methods = [args.same_bits_as] + [m for m in args.methods if m != args.same_bits_as]
    if args.evaluate_again and args.recorded_only:
        parser.error("--evaluate-again measures the models again; --recorded-only runs nothing: pick one")
    if args.tag == UNTAGGED:
        parser.error(f"--tag {UNTAGGED} is --reuse's name for the runs of no tag; pick another name")
    for source in args.reuse:
        _parse_reuse(source)
    settings = Settings()
    if args.calib_samples is not None:
        if args.calib_samples < 1:
            parser.error(f"--calib-samples must be at least 1, got {args.calib_samples}")
        if not args.tag:
            parser.error("--calib-samples needs a --tag: runs are recorded by tag, and untagged runs use the default "
                         "calibration size")
        settings = dataclasses.replace(settings, calib_windows=args.calib_samples,
                                       whisper_calib_sentences=args.calib_samples)
    args.work.mkdir(parents=True, exist_ok=True)
    records, cold = [], []
    for model in args.models:
        for seed in args.seeds:
            setup = MODELS[model](args.work, seed, settings)
            if seed == args.seeds[0]:
                records.append(_reference(args.work, setup, model, args.recorded_only, args.evaluate_again))
            for bits in args.bits:
                for method in args.methods:
                    options = list(args.options) if method.startswith("mgvq") else []
                    if args.vector_dim and method in VQ_METHODS:
                        options.append(f"*.vector_dim={args.vector_dim}")
                    budget = (matched_budget(records, model, args.same_bits_as, bits, seed)
                              if args.same_bits_as and method in BUDGETED_METHODS else None)
                    record = _run_one(args.work, setup, model, method, bits, seed, options, args.tag,
                                      args.recorded_only, args.reuse, args.evaluate_again, budget)
                    if record is None:
                        continue
                    records.append(record)
                    shown = {k: record[k] for k in ("perplexity", "wer", "nll", "bits_per_weight", "compile_s")
                             if k in record}
                    print(f"{model} {method} {bits:g}-bit seed {seed}: {shown}", flush=True)
        cold_path = _cold_record_path(args.work, model, args.cold, args.bits[0], args.seeds[0], args.tag)
        if args.cold in args.methods and args.recorded_only and cold_path.exists():
            cold.append(json.loads(cold_path.read_text()))
        elif args.cold in args.methods and not args.recorded_only:
            bits, seed = args.bits[0], args.seeds[0]
            options = next(r["options"] for r in records if (r["model"], r["method"], r["bits"], r["seed"]) == (model, args.cold, bits, seed))
            cold.append(_cold_compile(args.work, MODELS[model](args.work, seed, settings), model, args.cold, bits, seed,
                                      options, args.tag))
            print(cold_compile_lines(cold[-1:])[0], flush=True)
    stem = "accuracy" + (f"-{args.tag}" if args.tag else "")
    command = "python benchmarks/accuracy.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    asked = {(m, "fp32", 32, None) for m in args.models} | {
        (m, method, bits, seed) for m in args.models for method in args.methods for bits in args.bits for seed in args.seeds}
    records, earlier_command = merged_with_earlier(records, RESULTS / f"{stem}.json", asked, settings)
    if earlier_command:
        command += f"; other runs kept from {earlier_command}"
    rows = summarize(records)
    header = (f"## Accuracy at equal stored bits ({command})\n\nMachine: {platform.machine()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}. Settings: "
              + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(
        {"command": command, "settings": dataclasses.asdict(settings), "rows": rows, "runs": records,
         "cold_compiles": cold}, indent=1))
    table = markdown(rows, header) + "\n".join(cold_compile_lines(cold)) + ("\n" if cold else "")
    write_text_atomic(RESULTS / f"{stem}.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
