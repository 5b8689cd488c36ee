"""Quality figures of ONNX models run in ONNX Runtime: causal-LM perplexity, Whisper WER and NLL."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from mgvq_compile.calibration.data import next_token_labels, text_windows
from mgvq_compile.runtime import create_session

__all__ = [
    "ort_session",
    "token_nll",
    "perplexity_ort",
    "normalize_transcript",
    "WordEdits",
    "word_edits",
    "word_errors",
    "wer",
    "whisper_eval_ort",
]

logger = logging.getLogger(__name__)


def ort_session(path: str | Path | bytes, providers: list[str] | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An ORT session (CPU unless ``providers`` says otherwise) with the mgvq custom ops registered, so
    compiled models (``mgvq.VQGemm`` nodes) run as well as float and ``--portable`` ones."""
    return create_session(path, providers=providers, threads=threads)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ``targets`` (-100 = ignore) under ``logits`` [..., V], and the count."""
    logits = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    targets = np.asarray(targets).reshape(-1)
    keep = targets >= 0
    logits, targets = logits[keep], targets[keep]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].sum()), int(keep.sum())


def perplexity_ort(
    path: str | Path | None, tokenizer_or_ids: Any, text: str | None = None, *, seq_len: int, max_windows: int | None,
    seed: int = 1234, providers: list[str] | None = None, session: ort.InferenceSession | None = None,
    input_name: str = "input_ids",
) -> float:
    """Perplexity of a graph ``input_ids[1, seq_len] -> logits`` over disjoint windows of the text.

    ``tokenizer_or_ids`` is a tokenizer (then ``text`` is tokenized without special tokens) or the token
    ids themselves. Windows are non-overlapping, aligned to multiples of ``seq_len``; ``max_windows`` of
    them are chosen by ``seed`` (``None``: all). Each window is scored on its own, ``seq_len - 1``
    predictions per window, no context carried over.
    """
    session = session or ort_session(path, providers)
    if callable(tokenizer_or_ids):
        if text is None:
            raise ValueError("perplexity_ort needs text when given a tokenizer")
        ids = tokenizer_or_ids(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer_or_ids
    windows = text_windows(ids, seq_len, max_windows, seed)
    if not windows:
        raise ValueError(f"the text holds fewer than seq_len={seq_len} tokens")
    total = count = 0
    for window in windows:
        (logits,) = session.run(["logits"], {input_name: window[None, :]})
        nll, n = token_nll(logits[0, :-1], window[1:])
        total, count = total + nll, count + n
    return float(np.exp(total / count))


def normalize_transcript(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (apostrophes inside words kept)."""
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]


class WordEdits(NamedTuple):
    """One minimum-edit alignment of a hypothesis to its reference, counted by kind of edit."""

    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def hypothesis_words(self) -> int:
        """Every hypothesis word is matched, substituted or inserted; every reference word matched,
        substituted or deleted."""
        return self.reference_words - self.deletions + self.insertions


def word_edits(ref: str, hyp: str) -> WordEdits:
    """Word-level Levenshtein alignment after :func:`normalize_transcript`, split into substitutions,
    deletions (reference words missing) and insertions (extra hypothesis words). Among the alignments of
    minimum distance it prefers substitutions, then deletions, so the split is deterministic."""
    r, h = normalize_transcript(ref), normalize_transcript(hyp)
    # cost[i][j]: edits turning r[:i] into h[:j].
    cost = [list(range(len(h) + 1))] + [[i] + [0] * len(h) for i in range(1, len(r) + 1)]
    for i in range(1, len(r) + 1):
        for j in range(1, len(h) + 1):
            cost[i][j] = min(cost[i - 1][j] + 1, cost[i][j - 1] + 1, cost[i - 1][j - 1] + (r[i - 1] != h[j - 1]))
    subs = dels = ins = 0
    i, j = len(r), len(h)
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (r[i - 1] != h[j - 1]):
            subs += r[i - 1] != h[j - 1]
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            dels, i = dels + 1, i - 1
        else:
            ins, j = ins + 1, j - 1
    return WordEdits(subs, dels, ins, len(r))


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word-level Levenshtein distance, number of reference words) after :func:`normalize_transcript`."""
    edits = word_edits(ref, hyp)
    return edits.errors, edits.reference_words


def wer(ref: str, hyp: str) -> float:
    """Word error rate of one hypothesis (edits / reference words; 0 for two empty texts)."""
    errors, n = word_errors(ref, hyp)
    return errors / n if n else float(errors > 0)


class _SplitWhisper:
    """Greedy-decoding runner: the encoder part (audio features -> cross-attention keys/values) runs once
    per utterance, the decoder part once per token (:func:`mgvq_compile.graph_split.split_static_part`)."""

    def __init__(self, path: str | Path, providers: list[str] | None):
        import onnx

        from mgvq_compile.graph_split import split_static_part

        static, dynamic, self.frontier = split_static_part(onnx.load(str(path)), ["input_features"])
        self.encoder = ort_session(static.SerializeToString(), providers)
        self.decoder = ort_session(dynamic.SerializeToString(), providers)

    def step_function(self, feats: np.ndarray):
        cached = dict(zip(self.frontier, self.encoder.run(self.frontier, {"input_features": feats})))
        return lambda ids: self.decoder.run(["logits"], {"decoder_input_ids": ids, **cached})[0]


def _whisper_greedy(logits_of, decoder_len: int, max_new_tokens: int,
                    suppress: tuple[list[int], list[int]]) -> tuple[list[int], bool]:
    """Greedy tokens after the prompt, and whether the decode ended on end-of-text (False: it ran to the
    token limit); ``logits_of(ids [1, decoder_len]) -> logits`` for fixed audio."""
    from mgvq_compile.models.whisper_ct2 import DECODER_PROMPT, EOT_ID, apply_suppression

    ids = np.full((1, decoder_len), EOT_ID, dtype=np.int64)
    n = len(DECODER_PROMPT)
    ids[0, :n] = DECODER_PROMPT
    generated: list[int] = []
    while n < decoder_len and len(generated) < max_new_tokens:
        step = logits_of(ids)[0, n - 1].astype(np.float64)
        apply_suppression(step, len(generated), suppress)
        nxt = int(step.argmax())
        if nxt == EOT_ID:
            return generated, True
        generated.append(nxt)
        ids[0, n] = nxt
        n += 1
    return generated, False


def whisper_eval_ort(
    path: str | Path | None, tokenizer: Any, references: Sequence[str], *, decoder_len: int,
    audios: Sequence[np.ndarray] | None = None, feature_extractor: Any = None, max_new_tokens: int | None = None,
    providers: list[str] | None = None, session: ort.InferenceSession | None = None,
) -> dict[str, Any]:
    """WER and teacher-forced NLL of a Whisper graph ``(input_features[1,80,3000], decoder_input_ids[1,L]) -> logits``.

    Speech is ``audios`` (16 kHz float32) or espeak-ng's reading of each reference. NLL is the mean over
    the transcript's text and end-of-text tokens of the reference, fed padded to ``decoder_len`` (the
    decoder is causal, so the padding after a position cannot change its logits). Greedy decoding uses the
    same fixed-length graph: the tokens so far are padded to ``decoder_len`` and the logits at the last
    real position pick the next token, until end-of-text or ``decoder_len`` tokens. Given a ``path``, the
    graph is split so the encoder runs once per utterance and only the decoder per token (the same
    computation; logits agree to float rounding); given only a ``session``, the whole graph runs per token.
    WER is corpus-level: total word edits over total reference words, also split by kind of edit
    (``wer_substitutions``, ``wer_deletions``, ``wer_insertions``: a near-empty transcript scores about 1
    in deletions, a looping one above 1 in insertions). ``unfinished_decodes`` counts the
    decodes that ran to the token limit without end-of-text (at low bits, mostly repetition loops), and
    ``hypothesis_words`` the words transcribed, against ``n_words`` in the references.
    """
    from mgvq_compile.calibration.speech import SAMPLE_RATE, synthesize_speech
    from mgvq_compile.models.whisper_ct2 import DECODER_PROMPT, EOT_ID, suppress_token_ids, whisper_feature_extractor

    session = session or ort_session(path, providers)
    split = _SplitWhisper(path, providers) if path is not None else None
    feature_extractor = feature_extractor or whisper_feature_extractor()
    suppress = suppress_token_ids()
    if audios is not None and len(audios) != len(references):
        raise ValueError(f"{len(audios)} audios for {len(references)} references")
    budget = decoder_len - len(DECODER_PROMPT) if max_new_tokens is None else max_new_tokens
    total_nll = n_tokens = n_words = hypothesis_words = unfinished = subs = dels = ins = 0
    hypotheses = []
    for i, ref in enumerate(references):
        audio = audios[i] if audios is not None else synthesize_speech(ref)
        feats = feature_extractor(np.asarray(audio, dtype=np.float32), sampling_rate=SAMPLE_RATE,
                                  return_tensors="np")["input_features"].astype(np.float32)
        ref_ids = np.asarray(tokenizer(ref)["input_ids"], dtype=np.int64)[:decoder_len]
        padded = np.full((1, decoder_len), EOT_ID, dtype=np.int64)
        padded[0, :ref_ids.size] = ref_ids
        (logits,) = session.run(["logits"], {"input_features": feats, "decoder_input_ids": padded})
        labels = next_token_labels(padded, first_target=len(DECODER_PROMPT), n_real=ref_ids.size)
        nll, n = token_nll(logits, labels)
        total_nll, n_tokens = total_nll + nll, n_tokens + n
        if split is not None:
            logits_of = split.step_function(feats)
        else:
            logits_of = lambda ids: session.run(["logits"], {"input_features": feats, "decoder_input_ids": ids})[0]  # noqa: E731
        tokens, ended = _whisper_greedy(logits_of, decoder_len, budget, suppress)
        hyp = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        edits = word_edits(ref, hyp)
        subs, dels, ins = subs + edits.substitutions, dels + edits.deletions, ins + edits.insertions
        n_words += edits.reference_words
        hypothesis_words += edits.hypothesis_words
        unfinished += not ended
        hypotheses.append(hyp)
        logger.info("whisper eval %d: %r -> %r", i, ref, hyp)
    words = max(n_words, 1)
    return {
        "wer": (subs + dels + ins) / words,
        "wer_substitutions": subs / words,
        "wer_deletions": dels / words,
        "wer_insertions": ins / words,
        "nll": total_nll / max(n_tokens, 1),
        "n_tokens": n_tokens,
        "n_words": n_words,
        "hypothesis_words": hypothesis_words,
        "unfinished_decodes": unfinished,
        "hypotheses": hypotheses,
    }
