"""Builders of calibration directories from real text, image+prompt pairs and speech.

A calibration directory holds one ``.npz`` per feed (graph input name -> array), read in sorted file order.
A feed may hold ``labels`` (int64, ``-100`` = ignore) for a cross-entropy loss on the ``logits`` output.
Convention: **the label at position t is the target of the logits at position t**, i.e. for a causal LM
``labels[t] = input_ids[t + 1]`` and the last position (whose next token is not in the window) is ``-100``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgvq_compile.calibration.feeds import LABELS_KEY, TOKEN_MODALITY_KEY, load_calibration_dir, write_feed
from mgvq_compile.calibration.speech import SAMPLE_RATE, synthesize_speech
from mgvq_compile.errors import CalibrationError, InputError

__all__ = [
    "IGNORE_INDEX",
    "LABELS_KEY",
    "NOVELS",
    "data_dir",
    "read_novel",
    "novel_sentences",
    "next_token_labels",
    "window_starts",
    "text_windows",
    "write_text_calibration",
    "write_image_prompt_calibration",
    "write_speech_calibration",
    "load_calibration_dir",
    "split_labels",
    "synthesize_speech",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
NOVELS = ("emma", "mansfield_park", "pride_and_prejudice", "sense_and_sensibility")
_REPO = Path(__file__).resolve().parents[2]
_FEED_NAME = re.compile(r"feed_\d{5}\.npz")
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def data_dir() -> Path:
    """The Austen directory: ``$MGVQ_DATA_DIR/austen`` (or ``$MGVQ_DATA_DIR`` itself), else ``<repo>/../shared/data/austen``."""
    env = os.environ.get("MGVQ_DATA_DIR")
    if env:
        base = Path(env)
        return base / "austen" if (base / "austen").is_dir() else base
    return _REPO.parent / "shared" / "data" / "austen"


def read_novel(name: str) -> str:
    """The text of one Austen novel (``emma``, ``pride_and_prejudice``, ...), Gutenberg header/footer removed."""
    stem = name[:-4] if name.endswith(".txt") else name
    path = data_dir() / f"{stem}.txt"
    if not path.is_file():
        raise InputError(f"novel {name!r} not found at {path}",
                         f"use one of {', '.join(NOVELS)}, or set MGVQ_DATA_DIR to the data directory")
    text = path.read_text(encoding="utf-8-sig")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip()


def next_token_labels(ids: np.ndarray, first_target: int = 1, n_real: int | None = None) -> np.ndarray:
    """``labels[t] = ids[t + 1]`` for targets ``first_target <= t + 1 < n_real``, ``-100`` elsewhere (last axis)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.shape[-1] if n_real is None else n_real
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    lo = max(first_target, 1)
    if n > lo:
        labels[..., lo - 1:n - 1] = ids[..., lo:n]
    return labels


def window_starts(n_tokens: int, seq_len: int, n_windows: int | None, seed: int) -> np.ndarray:
    """Token offsets of ``n_windows`` disjoint, ``seq_len``-aligned windows chosen by ``seed`` (sorted).

    ``None`` (or more windows than the text holds) takes every whole window.
    """
    total = n_tokens // seq_len
    if n_windows is None or n_windows >= total:
        return np.arange(total, dtype=np.int64) * seq_len
    chosen = np.random.default_rng(seed).choice(total, size=n_windows, replace=False)
    return np.sort(chosen).astype(np.int64) * seq_len


def text_windows(ids: Sequence[int] | np.ndarray, seq_len: int, max_windows: int | None, seed: int) -> list[np.ndarray]:
    """The int64 ``[seq_len]`` windows of ``ids`` at :func:`window_starts`."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return [ids[s:s + seq_len] for s in window_starts(ids.size, seq_len, max_windows, seed)]


def _prepare_out_dir(out_dir: str | os.PathLike, names: Sequence[str]) -> Path:
    """Create ``out_dir``; drop stale ``feed_NNNNN.npz`` of an earlier run, refuse foreign ``.npz`` files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep = set(names)
    stale = sorted(p for p in out.glob("*.npz") if p.name not in keep and _FEED_NAME.fullmatch(p.name))
    stray = sorted(p.name for p in out.glob("*.npz") if p.name not in keep and not _FEED_NAME.fullmatch(p.name))
    if stray:
        raise CalibrationError(
            f"{out} already holds other calibration files ({', '.join(stray[:3])}{'...' if len(stray) > 3 else ''})",
            "write into an empty directory: every .npz in it becomes a calibration feed",
        )
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed %d stale feeds from %s", len(stale), out)
    return out


def novel_sentences(text: str, n: int, *, seed: int, min_words: int = 6, max_words: int = 20) -> list[str]:
    """``n`` sentences of ``text`` with ``min_words``..``max_words`` words, chosen by ``seed``, in text order.

    Sentences end at ``.``, ``!`` or ``?``; line breaks and repeated spaces are collapsed, and sentences
    with quotes, brackets or digits are skipped (speech synthesis reads them ambiguously).
    """
    flat = re.sub(r"\s+", " ", text.replace("_", ""))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat)]
    usable = [s for s in sentences
              if min_words <= len(s.split()) <= max_words and s[0].isupper()
              and not re.search(r"[\"'()\[\]\d;:]|--|\b(Mr|Mrs|Dr|St)\.$", s)]
    if len(usable) < n:
        raise CalibrationError(f"the text has {len(usable)} usable sentences, fewer than the {n} asked for",
                               "ask for fewer sentences or allow more words per sentence")
    chosen = np.sort(np.random.default_rng(seed).choice(len(usable), size=n, replace=False))
    return [usable[i] for i in chosen]


def _file_names(n: int) -> list[str]:
    return [f"feed_{i:05d}.npz" for i in range(n)]


def write_text_calibration(out_dir: str | os.PathLike, tokenizer: Any, text: str, *, seq_len: int, n_samples: int,
                           seed: int = 0, input_name: str = "input_ids") -> list[Path]:
    """``n_samples`` disjoint windows of ``seq_len`` tokens of ``text``, chosen by ``seed``, as feeds.

    Each feed is ``{input_name: int64[1, seq_len], "labels": int64[1, seq_len]}`` with next-token labels
    (see the module docstring). The windows are whole, aligned chunks of the token stream, in text order.
    """
    if seq_len < 2 or n_samples < 1:
        raise CalibrationError(f"seq_len must be >= 2 and n_samples >= 1, got {seq_len} and {n_samples}")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    if ids.size // seq_len < n_samples:
        raise CalibrationError(
            f"the text has {ids.size} tokens: {ids.size // seq_len} windows of {seq_len}, "
            f"fewer than the {n_samples} asked for",
            "use a longer text, a shorter seq_len or fewer samples",
        )
    names = _file_names(n_samples)
    out = _prepare_out_dir(out_dir, names)
    paths = []
    for name, window in zip(names, text_windows(ids, seq_len, n_samples, seed)):
        window = window.reshape(1, seq_len)
        paths.append(write_feed(out / name, {input_name: window, LABELS_KEY: next_token_labels(window)}))
    logger.info("wrote %d text feeds of %d tokens to %s", n_samples, seq_len, out)
    return paths


def _image_token_id(processor: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is not None:
        return int(token_id)
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if token is not None and tokenizer is not None:
        value = tokenizer.convert_tokens_to_ids(token)
        return int(value) if value is not None else None
    return None


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


def write_image_prompt_calibration(
    out_dir: str | os.PathLike,
    processor: Any,
    pairs: Sequence[tuple[Any, str, str]],
    *,
    input_names: Mapping[str, str] | None = None,
    max_length: int | None = None,
) -> list[Path]:
    """Feeds from ``(image, prompt, answer)`` triples run through a transformers processor.

    The processor sees ``prompt + answer``; labels are the next-token targets on the answer tokens only
    (``-100`` on the prompt and image tokens). The answer starts where the tokens of ``prompt + answer``
    first differ from those of ``prompt`` alone (so a tokenizer that appends an end token is handled, and
    the end token after the answer is a target). ``input_names`` maps processor outputs to graph input names
    (default: every output under its own name). ``max_length`` right-pads ``input_ids`` (pad token,
    ``attention_mask`` 0, label -100) so every feed has the static shape of the graph. When the
    processor names an image token, the feed also gets ``token_modality`` (1 on image tokens).
    """
    if not pairs:
        raise CalibrationError("no (image, prompt, answer) pairs given")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    image_id = _image_token_id(processor)
    names = _file_names(len(pairs))
    out = _prepare_out_dir(out_dir, names)
    paths = []
    for name, (image, prompt, answer) in zip(names, pairs):
        full = processor(images=[image], text=[prompt + answer], return_tensors="np")
        prompt_only = processor(images=[image], text=[prompt], return_tensors="np")
        ids = np.asarray(full["input_ids"], dtype=np.int64)
        if ids.shape[0] != 1:
            raise CalibrationError(f"the processor returned a batch of {ids.shape[0]} for one pair")
        n_prompt, n_real = _common_prefix(ids[0], np.asarray(prompt_only["input_ids"])[0]), ids.shape[-1]
        if n_real <= n_prompt:
            raise CalibrationError(f"answer {answer!r} adds no tokens to prompt {prompt[:40]!r}")
        feed = {k: np.asarray(v) for k, v in full.items()}
        feed["input_ids"] = ids
        labels = next_token_labels(ids, first_target=n_prompt)
        if max_length is not None:
            if n_real > max_length:
                raise CalibrationError(f"a prompt+answer of {n_real} tokens exceeds max_length={max_length}",
                                       "raise max_length (and the graph's sequence length) or shorten the text")
            pad = [(0, 0)] * (ids.ndim - 1) + [(0, max_length - n_real)]
            feed["input_ids"] = np.pad(ids, pad, constant_values=pad_id)
            labels = np.pad(labels, pad, constant_values=IGNORE_INDEX)
            for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
                if key in feed and feed[key].shape[-1] == n_real:
                    feed[key] = np.pad(feed[key], pad, constant_values=0)
        if image_id is not None:
            feed[TOKEN_MODALITY_KEY] = (feed["input_ids"] == image_id).astype(np.int64)
        if input_names is not None:
            missing = sorted(set(input_names) - set(feed))
            if missing:
                raise CalibrationError(f"the processor output has no {missing}; it has {sorted(feed)}")
            feed = {graph: feed[key] for key, graph in input_names.items()} | {
                k: feed[k] for k in (TOKEN_MODALITY_KEY,) if k in feed}
        feed[LABELS_KEY] = labels
        paths.append(write_feed(out / name, feed))
    logger.info("wrote %d image+prompt feeds to %s", len(paths), out)
    return paths


def write_speech_calibration(
    out_dir: str | os.PathLike,
    feature_extractor: Any,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    decoder_len: int,
    audios: Sequence[np.ndarray] | None = None,
    prompt_len: int = 2,
    pad_id: int = 50256,
    features_name: str = "input_features",
    ids_name: str = "decoder_input_ids",
) -> list[Path]:
    """Whisper feeds: log-mel features of each sentence's speech and its transcript as decoder input.

    Speech comes from ``audios`` (16 kHz float32) or is synthesized with espeak-ng. The decoder input is
    the tokenizer's ``<|startoftranscript|><|notimestamps|> text <|endoftext|>`` right-padded with
    ``pad_id`` to ``decoder_len``; labels are the next-token targets of the text and end-of-text tokens
    (the ``prompt_len`` prompt tokens and the padding are ``-100``).
    """
    if not sentences:
        raise CalibrationError("no sentences given")
    if audios is not None and len(audios) != len(sentences):
        raise CalibrationError(f"{len(audios)} audios for {len(sentences)} sentences")
    names = _file_names(len(sentences))
    out = _prepare_out_dir(out_dir, names)
    paths = []
    for i, (name, sentence) in enumerate(zip(names, sentences)):
        audio = audios[i] if audios is not None else synthesize_speech(sentence)
        feats = feature_extractor(np.asarray(audio, dtype=np.float32), sampling_rate=SAMPLE_RATE,
                                  return_tensors="np")["input_features"].astype(np.float32)
        ids = np.asarray(tokenizer(sentence)["input_ids"], dtype=np.int64)
        if ids.size > decoder_len:
            raise CalibrationError(f"sentence {i} has {ids.size} decoder tokens, more than decoder_len={decoder_len}",
                                   "export the decoder with a longer decoder_len or split the sentence")
        padded = np.full((1, decoder_len), pad_id, dtype=np.int64)
        padded[0, :ids.size] = ids
        labels = next_token_labels(padded, first_target=prompt_len, n_real=ids.size)
        paths.append(write_feed(out / name, {features_name: feats, ids_name: padded, LABELS_KEY: labels}))
    logger.info("wrote %d speech feeds to %s", len(paths), out)
    return paths


def split_labels(feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``(feed without labels, labels or None)``."""
    rest = {k: v for k, v in feed.items() if k != LABELS_KEY}
    return rest, feed.get(LABELS_KEY)
