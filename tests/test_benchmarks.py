"""The pieces of benchmarks/kernels.py and benchmarks/opbench.py. A whole run takes minutes, so it is
not part of the suite: ``python benchmarks/kernels.py --quick`` is the smoke run."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from mgvq_compile.runtime import create_session
from mgvq_compile.vqgemm import decode_from_stored
from vq_helpers import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import accuracy  # noqa: E402
import distortion  # noqa: E402
import gradient  # noqa: E402
import kernel_builds  # noqa: E402
import kernels  # noqa: E402
import opbench  # noqa: E402


def run(model: bytes, x: np.ndarray) -> np.ndarray:
    return create_session(model, threads=1).run(None, {"x": x})[0]



def initializers(model: bytes) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    proto = onnx.load_from_string(model)
    return proto.graph.node[0], {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_vq_model_computes_x_times_its_stored_weight():
    rng = np.random.default_rng(0)
    model = opbench.vq_model(rng, 64, 24, 3, bits=2, d=4)
    node, arrays = initializers(model)
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = decode_from_stored(attributes, arrays["codebooks"], arrays["codes"], arrays["perm"], None)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    assert rel_err(run(model, x), x @ weight.T) < 1e-5
    assert opbench.initializer_nbytes(model) == sum(a.nbytes for a in arrays.values()) == 64 * 24 * 2 // 8 + 256 * 4 * 2 + 64 * 4


@pytest.mark.parametrize("bits", [2, 4])
def test_nbits_model_follows_matmulnbits_layout(bits):
    """K = 200 is not a multiple of the block (128): the last block is padded, as the op specifies."""
    rng = np.random.default_rng(bits)
    n, m, block = 200, 8, 128
    model = opbench.nbits_model(rng, n, m, 2, bits, block)
    _node, arrays = initializers(model)
    packed, scales = arrays["b"], arrays["scales"].reshape(m, -1)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(m, -1)[:, :n].astype(np.float32)
    weight = (codes - (1 << (bits - 1))) * np.repeat(scales, block, axis=1)[:, :n]
    x = rng.standard_normal((2, n)).astype(np.float32)
    assert rel_err(run(model, x), x @ weight.T) < 1e-5


def test_dense_model_and_its_weight_bytes():
    rng = np.random.default_rng(1)
    model = opbench.dense_model(rng, 32, 16, 4)
    _node, arrays = initializers(model)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    assert rel_err(run(model, x), x @ arrays["w"]) < 1e-6
    assert opbench.initializer_nbytes(model) == 32 * 16 * 4


def test_time_runs_counts_runs_and_calls_before_each():
    calls = {"run": 0, "flush": 0}

    def step():
        calls["run"] += 1

    def flush():
        calls["flush"] += 1

    timing = opbench.time_runs(step, min_runs=5, max_runs=9, budget_s=0.0, warmup=2, before_each=flush)
    assert timing.runs == 5 and calls == {"run": 7, "flush": 5} and timing.median_s >= 0
    assert opbench.time_runs(step, min_runs=1, max_runs=9, budget_s=60.0, warmup=0).runs == 9


def test_bandwidth_and_cache_flusher_run():
    assert opbench.read_bandwidth_gbs(8 << 20, threads=1, runs=1) > 0
    assert opbench.copy_bandwidth_gbs(8 << 20, runs=1) > 0
    opbench.CacheFlusher(8 << 20, threads=1)()


def tiny_lm(path: Path, vocab: int = 2000, hidden: int = 8) -> Path:
    """input_ids[1, 1] -> Gather(embedding) -> MatMul -> logits: the inputs and outputs of the SmolLM2 export."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["logits"])],
        "lm", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 1])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 1, vocab])],
        [numpy_helper.from_array(rng.standard_normal((vocab, hidden), dtype=np.float32), "emb"),
         numpy_helper.from_array(rng.standard_normal((hidden, vocab), dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_zero_feed_and_session_memory_probe(tmp_path):
    path = tiny_lm(tmp_path / "lm.onnx")
    feed = opbench.zero_feed(create_session(path))
    assert feed["input_ids"].shape == (1, 1) and feed["input_ids"].dtype == np.int64
    rss = opbench.session_rss_growth(path, threads=1)
    assert set(rss) == {"baseline_bytes", "load_growth_bytes", "growth_bytes", "peak_growth_bytes"}
    assert rss["baseline_bytes"] > 0 and rss["peak_growth_bytes"] >= rss["growth_bytes"] - 4096
    assert opbench.current_rss_bytes() <= opbench.peak_rss_bytes()


def test_measure_decode_on_a_tiny_language_model(tmp_path):
    path = tiny_lm(tmp_path / "lm.onnx")
    row = kernels.measure_decode("tiny", path, 1, kernels.QUICK)
    assert row["model"] == "tiny" and row["file_bytes"] == path.stat().st_size
    assert row["tokens_per_s"] == pytest.approx(1e3 / row["step_ms"]) and row["runs"] >= 3
    assert "growth_bytes" in row


def op_row(op: str, ms: float, batch: int = 1) -> dict:
    return {"out": 8, "in": 16, "batch": batch, "op": op, "weight_bytes": 1000, "warm_ms": ms, "warm_min_ms": ms / 2, "warm_runs": 3,
            "cold_ms": 2 * ms, "cold_runs": 3, "warm_gbs": 1e-6 / ms, "cold_gbs": 0.5e-6 / ms}


def test_ratios_memory_check_and_report():
    rows = kernels.add_ratios([op_row("fp32 MatMul", 2.0), op_row("VQGemm 2-bit", 0.5), op_row("VQGemm 2-bit", 1.0, batch=16)],
                              bandwidth_gbs=1e-6)
    assert [r["speedup_vs_fp32"] for r in rows] == [1.0, 4.0, None]  # no fp32 row for batch 16
    assert rows[1]["cold_bw_fraction"] == pytest.approx(1.0)
    fp32 = {"model": "fp32", "file_bytes": 500e6, "growth_bytes": 520e6, "step_ms": 20.0, "step_min_ms": 19.0, "tokens_per_s": 50.0,
            "peak_growth_bytes": 600e6}
    good = {**fp32, "model": "2-bit", "file_bytes": 150e6, "growth_bytes": 180e6}
    bad = {**fp32, "model": "portable", "file_bytes": 150e6, "growth_bytes": 700e6}
    checks = [kernels.memory_check(fp32, good), kernels.memory_check(fp32, bad)]
    assert checks[0]["matches"] and checks[0]["drop_over_saved"] == pytest.approx(340 / 350)
    assert not checks[1]["matches"]
    record = {"command": "python benchmarks/kernels.py --quick", "machine": "test", "ort": "1", "threads": 2,
              "load_average_1min": {"start": 1.0, "end": 2.0},
              "date": "today", "quick": True, "ops": rows, "decode": [fp32, good, bad], "memory_checks": checks,
              "bandwidth": {"buffer_bytes": 1 << 28, "read_gbs_before": 10.0, "read_gbs_after": 11.0,
                            "reference_gbs": 11.0, "copy_gbs": 12.0}}
    record["speed_check"] = kernels.speed_check([
        {**op_row("VQGemm 2-bit d2", 0.4), "out": 4096, "in": 4096},
        {**op_row("MatMulNBits 2-bit acc0", 40.0), "out": 4096, "in": 4096},
        {**op_row("MatMulNBits 2-bit acc4", 0.1), "out": 4096, "in": 4096},
        {**op_row("MatMulNBits 2-bit acc4", 0.01, batch=16), "out": 4096, "in": 4096},  # another batch: ignored
    ])
    assert [(c["against"], c["meets_goal"]) for c in record["speed_check"]] == [
        ("MatMulNBits 2-bit acc0", True), ("MatMulNBits 2-bit acc4", False)]
    assert record["speed_check"][1]["ratio"] == pytest.approx(4.0)
    text = kernels.markdown_report(record)
    assert "| 4096x4096 | 1 | VQGemm 2-bit d2 | MatMulNBits 2-bit acc4 | 0.400 | 0.100 | 4.000x | <= 0.3x | no |" in text
    assert "| 8x16 | 1 | VQGemm 2-bit | 0.00 | 0.500 | 0.250 | 1.000 |" in text and "4.00x" in text
    assert "2-bit: session memory -340.0 MB against fp32" in text and "matches within ±15%" in text
    assert "portable" in text and "does not match" in text


def test_kernel_isa_names_the_level_the_library_picks(ops_library):
    if ops_library is None:
        pytest.skip("mgvq custom-op library could not be built; run python custom_ops/build.py")
    assert kernels.kernel_isa() in {"avx512", "avx2", "portable"}


def test_accuracy_summary_table_and_cold_compile_line():
    runs = [{"model": "smollm2", "method": "mgvq", "bits": 2.0, "seed": seed, "perplexity": ppl, "bits_per_weight": 2.0,
             "compile_s": 100.0 + seed, "peak_rss_mb": 900.0, "files_mb": 143.0} for seed, ppl in ((0, 10.0), (1, 14.0))]
    (row,) = accuracy.summarize(runs)
    assert row["perplexity"]["mean"] == 12.0 and row["perplexity"]["std"] == pytest.approx(2 ** 0.5 * 2)
    table = accuracy.markdown([row], "## header")
    assert row["log_perplexity"]["values"] == pytest.approx([np.log(10.0), np.log(14.0)])
    assert "| mgvq | 2 | 2 | 12.00 ± 2.83 | 2.471 ± 0.238 | 2.000 ± 0.000 |" in table
    cold = {"model": "smollm2", "method": "mgvq", "bits": 2.0, "seed": 0, "compile_s": 960.0, "peak_rss_mb": 2000.0,
            "identical_to_cached_run": True}
    (line,) = accuracy.cold_compile_lines([cold])
    assert "960 s = 16.0 min (over the 15-minute target)" in line and "byte-identical to the cached run: yes" in line


def test_accuracy_whisper_table_splits_wer_by_edit_and_skips_metrics_some_seeds_lack():
    parts = [(0.1, 0.8, 0.0), (0.2, 0.0, 1.2)]
    runs = [{"model": "whisper", "method": "gptvq", "bits": 2.0, "seed": seed, "wer": sum(p), "nll": 6.0,
             "unfinished_decodes": 30 * seed, **dict(zip(accuracy.WER_PARTS, p))} for seed, p in enumerate(parts)]
    runs[1]["compile_s"] = 90.0  # a resumed or reused run may lack a metric
    (row,) = accuracy.summarize(runs)
    assert "compile_s" not in row and row["wer_deletions"]["values"] == [0.8, 0.0]
    table = accuracy.markdown([row], "## header")
    assert "| wer | wer_substitutions | wer_deletions | wer_insertions | nll | unfinished_decodes |" in table
    assert "| gptvq | 2 | 2 | 1.150 ± 0.354 | 0.150 ± 0.071 | 0.400 ± 0.566 | 0.600 ± 0.849 | 6.000 ± 0.000 | 15.0 ± 21.2 |" in table


def test_distortion_step_ratios_are_per_layer_loss_ratios():
    report = {"layers": [{"name": "a", "quantized": True, "proxy_loss": 0.8},
                         {"name": "b", "quantized": True, "proxy_loss": 0.2},
                         {"name": "c", "quantized": False, "proxy_loss": 1.0}]}
    low = distortion.layer_losses(report, "proxy_loss")
    assert low == {"a": 0.8, "b": 0.2}
    (row,) = distortion.step_ratios({1: low, 2: {"a": 0.1, "b": 0.1}})
    assert (row["from_bits"], row["to_bits"], row["layers"]) == (1, 2, 2)
    assert row["geometric_mean"] == pytest.approx(4.0) and row["median"] == pytest.approx(5.0)


def test_gradient_rows_summary_and_table():
    import torch

    def layer(g):
        g = torch.tensor(g)
        return {"gradient": g, "tokens": 10, "signal_ratio": 2.0, "steps": {gradient.GRADIENT: g}}

    sets = {"seed 0": {"encoder.fc": layer([[1.0, 0.0]])}, "seed 1": {"encoder.fc": layer([[1.0, 1.0]])},
            gradient.HELDOUT: {"encoder.fc": layer([[-1.0, 0.0]])}}
    (row,) = gradient.layer_rows(sets)
    assert row["part"] == "encoder"
    assert row["cosine_between_seeds"] == pytest.approx(2 ** -0.5)
    # seed 0's direction keeps all of its gain on seed 1, seed 1's keeps half on seed 0; both reverse on held-out.
    assert row["transfer_between_seeds"][gradient.GRADIENT] == pytest.approx(0.75)
    assert row["transfer_heldout"][gradient.GRADIENT] == pytest.approx((-1.0 - 0.5) / 2)
    (summary,) = gradient.summarize("m", [row])
    assert summary["layers_with_heldout_descent"] == {gradient.GRADIENT: 0}
    table = gradient.markdown("cmd", [summary])
    assert "| m | encoder | 1 | 2.00 (2.00 to 2.00)" in table and "| 0/1 |" in table


def test_accuracy_recorded_only_reads_records_and_runs_nothing(tmp_path):
    (tmp_path / "runs").mkdir()
    record = {"model": "whisper", "method": "mgvq", "bits": 2.0, "seed": 0, "nll": 5.9}
    (tmp_path / "runs" / "whisper-mgvq-2bit-seed0-comp.json").write_text(json.dumps(record))
    args = (tmp_path, None, "whisper", "mgvq", 2.0)  # no setup: a compile would fail
    assert accuracy._run_one(*args, 0, [], "comp", recorded_only=True) == record
    assert accuracy._run_one(*args, 1, [], "comp", recorded_only=True) is None
    assert not (tmp_path / "models").exists()


def test_accuracy_reuse_takes_a_committed_record_marked_and_maps_methods(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    committed = {"model": "whisper", "method": "mgvq", "bits": 3.0, "seed": 1, "nll": 1.5}
    (tmp_path / "results" / "accuracy-old.json").write_text(json.dumps({"runs": [committed]}))
    args = (tmp_path / "work", None, "whisper")  # no setup: a compile would fail
    record = accuracy._run_one(*args, "mgvq-no-grad", 3.0, 1, [], "new", reuse=["old:mgvq=mgvq-no-grad"])
    assert record == {**committed, "method": "mgvq-no-grad", "reused_from": "--tag old, method mgvq"}
    # Recorded under --work from then on, so a later --recorded-only table has it.
    assert accuracy._run_one(*args, "mgvq-no-grad", 3.0, 1, [], "new", recorded_only=True) == record
    # A mapping applies to its target method only; other seeds, bits or methods are not taken.
    assert accuracy._run_one(*args, "mgvq", 3.0, 1, [], "new", recorded_only=True, reuse=["old:mgvq=mgvq-no-grad"]) is None
    assert accuracy._run_one(*args, "mgvq", 3.0, 2, [], "new", recorded_only=True, reuse=["old"]) is None
    assert accuracy._run_one(*args, "mgvq", 3.0, 1, [], "new", recorded_only=True, reuse=["old:gptvq"]) is None
    assert accuracy._run_one(*args, "mgvq", 3.0, 1, [], "new", recorded_only=True, reuse=["old:mgvq"])["nll"] == 1.5
    # The committed source changes (evaluated again, say): the kept copy follows it when reused again.
    (tmp_path / "results" / "accuracy-old.json").write_text(json.dumps({"runs": [{**committed, "wer_deletions": 0.9}]}))
    accuracy._committed_runs.cache_clear()  # a later benchmark reads the file anew
    kept = accuracy._run_one(*args, "mgvq-no-grad", 3.0, 1, [], "new", recorded_only=True)
    assert "wer_deletions" not in kept  # without --reuse the copy stands
    followed = accuracy._run_one(*args, "mgvq-no-grad", 3.0, 1, [], "new", recorded_only=True, reuse=["old:mgvq=mgvq-no-grad"])
    assert followed == {**record, "wer_deletions": 0.9}
    assert accuracy._run_one(*args, "mgvq-no-grad", 3.0, 1, [], "new", recorded_only=True) == followed
    # Only a new measurement counts: a source that differs in where it came from alone (a table reusing
    # its own runs) leaves the copy as it is.
    (tmp_path / "results" / "accuracy-old.json").write_text(json.dumps(
        {"runs": [{**committed, "wer_deletions": 0.9, "reused_from": "no --tag, method mgvq"}]}))
    accuracy._committed_runs.cache_clear()
    assert accuracy._run_one(*args, "mgvq-no-grad", 3.0, 1, [], "new", recorded_only=True,
                             reuse=["old:mgvq=mgvq-no-grad"]) == followed
    for bad in ("missing", "old:mgvq=", ":mgvq=mgvq"):
        with pytest.raises(SystemExit, match="--reuse"):
            accuracy.reused_record([bad], "whisper", "mgvq", 3.0, 1)


def test_accuracy_runs_are_matched_by_calibration_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    calibrated = lambda name: {"model": "whisper", "method": "mgvq", "bits": 2.0, "seed": 0,  # noqa: E731
                               "command": f"m.onnx -o out --method mgvq --calib /w/{name} --seed 0", "nll": 4.0}
    (tmp_path / "results" / "accuracy.json").write_text(json.dumps({"runs": [calibrated("whisper-calib-32-seed0")]}))
    assert accuracy.calibration_of(calibrated("c-128")) == "c-128"
    assert accuracy.calibration_of({"method": "fp32"}) is None
    setup = accuracy.ModelSetup(Path("fp.onnx"), Path("/w/whisper-calib-128-seed0"), None, "wer")
    args = (tmp_path / "work", setup, "whisper", "mgvq", 2.0, 0, [], "")
    # The untagged committed run read 32 sentences, this setup 128: not reused (and nothing to compute here).
    assert accuracy._run_one(*args, recorded_only=True, reuse=[accuracy.UNTAGGED]) is None
    small = dataclasses.replace(setup, calib_dir=Path("/w/whisper-calib-32-seed0"))
    record = accuracy._run_one(*args[:1], small, *args[2:], recorded_only=True, reuse=[accuracy.UNTAGGED])
    assert record["nll"] == 4.0 and record["reused_from"] == "no --tag, method mgvq"
    # Now recorded under --work: a run asking for another calibration is refused, not served the old record.
    with pytest.raises(SystemExit, match="calibrated on whisper-calib-32-seed0.*another --tag"):
        accuracy._run_one(*args, recorded_only=True)
    # A record that was itself reused keeps its provenance.
    (tmp_path / "results" / "accuracy-chain.json").write_text(json.dumps({"runs": [record]}))
    again = accuracy.reused_record(["chain"], "whisper", "mgvq", 2.0, 0)
    assert again["reused_from"] == "--tag chain, method mgvq (there reused from no --tag, method mgvq)"


def test_accuracy_records_of_another_evaluation_size_are_evaluated_again(tmp_path):
    work, measured = tmp_path / "work", []
    model_dir = work / "models" / "whisper-mgvq-2bit-seed0"
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_bytes(b"kept")
    (work / "runs").mkdir()
    earlier = {"model": "whisper", "method": "mgvq", "bits": 2.0, "seed": 0, "compile_s": 99.0, "wer": 1.2, "nll": 3.0,
               "command": f"fp.onnx -o {model_dir} --method mgvq --calib /w/c --seed 0"}  # no eval_samples: 16
    record_path = work / "runs" / "whisper-mgvq-2bit-seed0.json"
    record_path.write_text(json.dumps(earlier))
    evaluate = lambda path: measured.append(path) or {"wer": 0.8, "nll": 2.5}  # noqa: E731
    setup = accuracy.ModelSetup(tmp_path / "fp.onnx", Path("/w/c"), evaluate, "wer", eval_samples=64)
    args = (work, setup, "whisper", "mgvq", 2.0, 0, [], "")
    with pytest.raises(SystemExit, match="evaluated on 16 samples, but this benchmark evaluates on 64.*without --recorded-only"):
        accuracy._run_one(*args, recorded_only=True)
    record = accuracy._run_one(*args)
    assert measured == [model_dir / "model.onnx"]
    assert record == {**earlier, "wer": 0.8, "nll": 2.5, "eval_samples": 64,
                      "earlier_evaluation": {"eval_samples": 16, "wer": 1.2, "nll": 3.0}}
    assert json.loads(record_path.read_text()) == record
    assert accuracy._run_one(*args, recorded_only=True) == record and len(measured) == 1
    again = accuracy._run_one(*args, evaluate_again=True)  # --evaluate-again: measured anew, same size
    assert len(measured) == 2 and again["earlier_evaluation"] == {"eval_samples": 16, "wer": 1.2, "nll": 3.0}
    # A record whose model files are gone cannot be measured again: it says so rather than keep old numbers.
    record_path.write_text(json.dumps(earlier))
    (model_dir / "model.onnx").unlink()
    with pytest.raises(SystemExit, match="model .* is gone: delete the record"):
        accuracy._run_one(*args)
    # The fp32 reference is measured again on the float graph.
    setup.fp_path.write_bytes(b"float")
    (work / "runs" / "whisper-fp32.json").write_text(json.dumps({"model": "whisper", "method": "fp32", "wer": 0.3}))
    reference = accuracy._reference(work, setup, "whisper")
    assert measured[-1] == setup.fp_path and reference["eval_samples"] == 64
    assert reference["earlier_evaluation"] == {"eval_samples": 16, "wer": 0.3}


def test_a_tag_run_in_two_invocations_keeps_one_table(tmp_path):
    run = lambda method, seed, **kw: {"model": "whisper", "method": method, "bits": 2.0, "seed": seed,  # noqa: E731
                                      "eval_samples": 64, **kw}
    fp32 = {"model": "whisper", "method": "fp32", "bits": 32, "seed": None, "eval_samples": 64}
    path = tmp_path / "accuracy-t.json"
    earlier = [fp32, run("gptq", 0, nll=9.0), run("gptq", 1, nll=9.5), run("gptvq", 0, nll=7.0),
               run("vlmq", 0, eval_samples=16, nll=9.9)]  # a run of another evaluation size
    path.write_text(json.dumps({"command": "python benchmarks/accuracy.py --methods gptq gptvq", "runs": earlier}))
    now = [fp32, run("gptvq", 0, nll=6.5), run("mgvq", 0, nll=2.5)]
    asked = {("whisper", "fp32", 32, None)} | {("whisper", m, 2.0, 0) for m in ("gptvq", "mgvq")}
    settings = accuracy.Settings(whisper_eval_sentences=64)
    merged, command = accuracy.merged_with_earlier(now, path, asked, settings)
    # gptvq seed 0 is this invocation's; gptq's runs were not asked for and stay; vlmq's 16-sentence run goes.
    assert [(r["method"], r["seed"], r.get("nll")) for r in merged] == [
        ("fp32", None, None), ("gptq", 0, 9.0), ("gptq", 1, 9.5), ("gptvq", 0, 6.5), ("mgvq", 0, 2.5)]
    assert command == "python benchmarks/accuracy.py --methods gptq gptvq"
    assert accuracy.merged_with_earlier(now, tmp_path / "none.json", asked, settings) == (now, None)


def test_layouts_of_a_report_are_timed_and_reported(ops_library, tmp_path):
    if ops_library is None:
        pytest.skip("mgvq custom-op library could not be built; run python custom_ops/build.py")
    layers = [
        {"name": "a", "quantized": True, "shape": [32, 64], "vector_dim": 2, "group_bounds": [0, 32, 64], "bits": [1, 4]},
        {"name": "b", "quantized": True, "shape": [32, 64], "vector_dim": 2, "group_bounds": [0, 32, 64], "bits": [1, 4]},
        {"name": "c", "quantized": True, "shape": [16, 64], "vector_dim": 2, "group_bounds": [0, 64], "bits": [2]},
        # a fractional width (the default layout since assign-bits config v14): 7-bit codes of d = 4
        {"name": "d", "quantized": True, "shape": [16, 64], "vector_dim": 4, "group_bounds": [0, 64], "bits": [1.75]},
        {"name": "head", "quantized": False, "shape": [100, 64]},
    ]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"layers": layers}))
    assert [lay["out"] for lay in kernels.read_layouts(report)] == [32, 32, 16, 16]
    result = kernels.measure_layouts(report, 1, kernels.QUICK)
    assert result["layers"] == 4 and result["wide_code_layers"] == 3
    assert result["vqgemm_ms"] > result["wide_code_vqgemm_ms"] > 0 and result["fp32_ms"] > 0
    assert result["weights_by_bits"] == pytest.approx(
        {"1": 2048 / 6144, "1.75": 1024 / 6144, "2": 1024 / 6144, "4": 2048 / 6144})
    text = "\n".join(kernels._layouts_section(result))
    assert "4 quantized layers" in text and "1 bits 33%" in text and "1.75 bits 17%" in text
    assert "Skipped: no report" in "\n".join(kernels._layouts_section({"skipped": "no report"}))


def test_kernel_builds_times_two_libraries_side_by_side(ops_library, tmp_path, capsys):
    if ops_library is None:
        pytest.skip("mgvq custom-op library could not be built; run python custom_ops/build.py")
    layers = [{"name": "a", "quantized": True, "shape": [16, 64], "vector_dim": 4, "group_bounds": [0, 64], "bits": [2.25]},
              {"name": "b", "quantized": True, "shape": [16, 64], "vector_dim": 2, "group_bounds": [0, 64], "bits": [2]}]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"layers": layers}))
    assert kernel_builds.main(["--baseline", ops_library, "--layouts", str(report), "--runs", "2", "--quick",
                               "--threads", "1", "--tag", "tiny", "--out-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "kernel_builds-tiny.json").read_text())
    assert [len(runs) for runs in record["runs"].values()] == [2, 2]
    assert record["layers"] == 2 and record["wide_code_layers"] == 1
    baseline, current = record["builds"]
    assert baseline["build"] == Path(ops_library).name and current["build"].startswith("current build")
    assert all(ms > 0 for row in record["builds"] for ms in row["vqgemm_ms"] + row["fp32_ms"])
    text = (tmp_path / "kernel_builds-tiny.md").read_text()
    assert f"Speed-up of {current['build']} over {baseline['build']}" in text and text in capsys.readouterr().out


def test_kernel_builds_refuses_a_baseline_it_cannot_find(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"layers": []}))
    assert kernel_builds.main(["--baseline", "no-such-commit", "--layouts", str(report), "--out-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "neither a library file nor a commit" in error and "HEAD~1" in error
    assert kernel_builds.main(["--layouts", str(report), "--out-dir", str(tmp_path)]) == 2
    assert "no --baseline" in capsys.readouterr().err
    assert not (tmp_path / "kernel_builds.json").exists()


def test_layer_subsets_refuses_bad_arguments(tmp_path, capsys):
    import layer_subsets

    compiled = tmp_path / "compiled"
    compiled.mkdir()
    (compiled / "report.json").write_text("{}")
    for argv, message in (([str(tmp_path)], "is not an mgvq-compile output"),
                          ([str(compiled), "--base", str(tmp_path)], f"{tmp_path} is not an mgvq-compile output"),
                          ([str(compiled), "--model", "llama"], "invalid choice"),
                          ([str(tmp_path), "--subset", "no-equals-sign"], "is not LABEL=REGEX")):
        with pytest.raises(SystemExit) as exit_info:
            layer_subsets.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert all("=" in subset for subset in layer_subsets.DEFAULT_SUBSETS + layer_subsets.SMOLLM2_SUBSETS)


def test_accuracy_same_bits_as_sets_the_budget_from_the_other_methods_run(tmp_path, monkeypatch, capsys):
    gptvq = {"model": "whisper", "method": "gptvq", "bits": 2.0, "seed": 0, "bits_per_weight": 2.06249}
    assert accuracy.matched_budget([gptvq], "whisper", "gptvq", 2.0, 0) == 2.0624  # cut, never above
    with pytest.raises(SystemExit, match="list gptvq before"):
        accuracy.matched_budget([gptvq], "whisper", "gptvq", 2.0, 1)
    # The budget is part of the run: a record compiled at another budget is neither reused nor served.
    (tmp_path / "runs").mkdir()
    record = {"model": "whisper", "method": "mgvq", "bits": 2.0, "seed": 0, "nll": 2.0}
    (tmp_path / "runs" / "whisper-mgvq-2bit-seed0-same.json").write_text(json.dumps(record))
    args = (tmp_path, None, "whisper", "mgvq", 2.0, 0, [], "same")
    with pytest.raises(SystemExit, match="budget of 2.0, not 2.0624"):
        accuracy._run_one(*args, recorded_only=True, budget=2.0624)
    (tmp_path / "runs" / "whisper-mgvq-2bit-seed0-same.json").write_text(json.dumps({**record, "budget_bits_per_weight": 2.0624}))
    assert accuracy._run_one(*args, recorded_only=True, budget=2.0624)["nll"] == 2.0
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "accuracy-old.json").write_text(json.dumps({"runs": [record]}))
    assert accuracy._run_one(tmp_path / "other", None, "whisper", "mgvq", 2.0, 0, [], "new", recorded_only=True,
                             reuse=["old"], budget=2.0624) is None
    with pytest.raises(SystemExit):
        accuracy.main(["--methods", "gptvq", "mgvq", "--same-bits-as", "mgvq", "--recorded-only"])
    assert "--same-bits-as mgvq: name a method of --methods whose widths are fixed" in capsys.readouterr().err


def test_allocation_shares_count_weights_per_width_and_the_proxy_geomean():
    import allocation_shares

    layer = lambda shape, bounds, bits, proxy: {"quantized": True, "shape": shape, "group_bounds": bounds,  # noqa: E731
                                                "bits": bits, "proxy_loss": proxy}
    report = {"summary": {"bits_per_weight": 2.05, "index_bits_per_weight": 1.95},
              "layers": [layer([4, 8], [0, 4, 8], [1.5, 2], 0.01), layer([2, 8], [0, 8], [3], 0.04),
                         {"quantized": False}]}
    shares = allocation_shares.allocation_shares(report)
    assert shares["widths"] == {1.5: 16 / 48, 2: 16 / 48, 3: 16 / 48}
    assert shares["proxy_geomean"] == pytest.approx(0.02)
    assert shares["bits_per_weight"] == 2.05
