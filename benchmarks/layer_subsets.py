"""Which layers' quantization costs a compiled Whisper tiny.en its accuracy: the float model with the
decoded (dequantized) weights of only a subset of its layers, evaluated like benchmarks/accuracy.py.

    python benchmarks/layer_subsets.py OUTDIR [OUTDIR ...] [--subset LABEL=REGEX ...] [--tag NAME]

OUTDIR is an mgvq-compile output of the benchmark's Whisper graph (benchmarks/work/accuracy/models/...).
Each subset puts the decoded weights of the layers whose names match REGEX (re.search) into the float
torch model and measures teacher-forced NLL and greedy WER on the accuracy benchmark's 16 evaluation
sentences. Errors of two layers need not add up: comparing a pair's row with each member's alone shows
how much they interact. Writes ``benchmarks/results/layer-subsets{-TAG}.json`` and ``.md``, and prints
the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (the benchmark's settings, evaluation novel and results folder)

DEFAULT_SUBSETS = (
    "none=^$", "all=.", "encoder=^model\\.encoder\\.", "decoder=^model\\.decoder\\.",
    "cross-attention=encoder_attn", "cross q=encoder_attn\\.q_proj", "cross k=encoder_attn\\.k_proj",
    "cross q+k=encoder_attn\\.(q|k)_proj", "every q+k=(q|k)_proj",
    "all but cross q+k=^(?!.*encoder_attn\\.(q|k)_proj)", "all but every q+k=^(?!.*(q|k)_proj)",
)


def evaluate_subsets(out_dir: Path, subsets: list[tuple[str, str]]) -> list[dict]:
    from mgvq_compile.calibration.data import next_token_labels, novel_sentences, read_novel
    from mgvq_compile.calibration.speech import SAMPLE_RATE, synthesize_speech
    from mgvq_compile.evaluate import token_nll, word_errors
    from mgvq_compile.models.whisper_ct2 import (
        DECODER_PROMPT, greedy_decode, load_whisper_tiny_en, suppress_token_ids, whisper_feature_extractor,
    )
    from mgvq_compile.output import dequantized_weights

    settings = accuracy.Settings()
    model, tokenizer = load_whisper_tiny_en()
    extractor, suppress = whisper_feature_extractor(), suppress_token_ids()
    references = novel_sentences(read_novel(accuracy.EVALUATION_NOVEL), settings.whisper_eval_sentences, seed=1234)
    features = [torch.from_numpy(extractor(synthesize_speech(ref).astype(np.float32), sampling_rate=SAMPLE_RATE,
                                           return_tensors="np")["input_features"].astype(np.float32))
                for ref in references]
    decoded = dequantized_weights(out_dir)
    budget = settings.whisper_decoder_len - len(DECODER_PROMPT)
    rows = []
    for label, pattern in subsets:
        regex = re.compile(pattern)
        subject = copy.deepcopy(model)
        parameters = dict(subject.named_parameters())
        names = [name for name in decoded if regex.search(name)]
        for name in names:
            parameters[name].data.copy_(torch.from_numpy(decoded[name]))
        nll = tokens = errors = words = 0
        with torch.no_grad():
            for ref, feats in zip(references, features):
                ids = np.asarray([tokenizer(ref)["input_ids"][:settings.whisper_decoder_len]], dtype=np.int64)
                logits = subject(input_features=feats, decoder_input_ids=torch.from_numpy(ids)).logits.numpy()
                sentence_nll, n = token_nll(logits, next_token_labels(ids, first_target=len(DECODER_PROMPT)))
                nll, tokens = nll + sentence_nll, tokens + n
                hyp = tokenizer.decode(greedy_decode(subject, feats, max_new_tokens=budget, suppress=suppress),
                                       skip_special_tokens=True)
                e, w = word_errors(ref, hyp)
                errors, words = errors + e, words + w
        rows.append({"model": str(out_dir), "subset": label, "pattern": pattern, "layers": len(names),
                     "nll": nll / tokens, "wer": errors / words})
        print(f"{out_dir.name}  {label:24s} {len(names):3d} layers  NLL {nll / tokens:.3f}  WER {errors / words:.3f}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="mgvq-compile output directories of the Whisper graph")
    parser.add_argument("--subset", action="append", metavar="LABEL=REGEX",
                        help="a subset of layers by weight name (repeatable; default: a standard set)")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    args = parser.parse_args(argv)
    subsets = []
    for item in args.subset or DEFAULT_SUBSETS:
        label, sep, pattern = item.partition("=")
        if not sep:
            parser.error(f"--subset {item!r} is not LABEL=REGEX")
        subsets.append((label, pattern))
    for out in args.outputs:
        if not (out / "report.json").exists():
            parser.error(f"{out} is not an mgvq-compile output (no report.json)")
    rows = [row for out in args.outputs for row in evaluate_subsets(out, subsets)]
    command = "python benchmarks/layer_subsets.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [f"## Whisper tiny.en with the decoded weights of some layers ({command})", "",
             f"Machine: {platform.machine()}, Python {platform.python_version()}. Float model: the rest.", "",
             "| compiled model | subset | layers | NLL | WER |", "|---|---|---|---|---|"]
    lines += [f"| {Path(r['model']).name} | {r['subset']} | {r['layers']} | {r['nll']:.3f} | {r['wer']:.3f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    suffix = f"-{args.tag}" if args.tag else ""
    accuracy.RESULTS.mkdir(parents=True, exist_ok=True)
    (accuracy.RESULTS / f"layer-subsets{suffix}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    (accuracy.RESULTS / f"layer-subsets{suffix}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
