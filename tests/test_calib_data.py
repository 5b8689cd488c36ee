"""Calibration directories: builders (text, image+prompt, speech), loading and its errors, data helpers."""

from __future__ import annotations

import numpy as np
import pytest

from mgvq_compile.calibration.data import (
    IGNORE_INDEX,
    load_calibration_dir,
    next_token_labels,
    read_novel,
    split_labels,
    text_windows,
    write_image_prompt_calibration,
    write_speech_calibration,
    write_text_calibration,
)
from mgvq_compile.calibration.feeds import write_feed
from mgvq_compile.calibration.speech import SAMPLE_RATE, espeak_available, resample, synthesize_speech
from mgvq_compile.errors import CalibrationError, InputError
from mgvq_compile.evaluate import WordEdits, normalize_transcript, wer, word_edits, word_errors


@pytest.fixture(scope="module")
def whisper_tokenizer():
    from mgvq_compile.models.whisper_ct2 import load_whisper_tokenizer

    return load_whisper_tokenizer()


class CharTokenizer:
    """One token per character: enough to check window arithmetic exactly."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_next_token_labels_convention():
    ids = np.array([[5, 6, 7, 8]])
    assert next_token_labels(ids).tolist() == [[6, 7, 8, IGNORE_INDEX]]
    # targets start at position 2 and stop at the 3 real tokens
    assert next_token_labels(ids, first_target=2, n_real=3).tolist() == [[IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]]


def test_text_windows_are_disjoint_aligned_and_seeded():
    ids = np.arange(100)
    windows = text_windows(ids, 10, 4, seed=3)
    starts = [int(w[0]) for w in windows]
    assert len(windows) == 4 and all(s % 10 == 0 for s in starts) and starts == sorted(set(starts))
    assert all(np.array_equal(w, np.arange(w[0], w[0] + 10)) for w in windows)
    assert [int(w[0]) for w in text_windows(ids, 10, 4, seed=3)] == starts
    assert [int(w[0]) for w in text_windows(ids, 10, 4, seed=4)] != starts
    assert len(text_windows(ids, 10, None, seed=0)) == 10
    assert len(text_windows(ids, 30, 99, seed=0)) == 3


def test_write_text_calibration_round_trip(tmp_path, whisper_tokenizer):
    text = read_novel("emma")[:20000]
    paths = write_text_calibration(tmp_path / "c", whisper_tokenizer, text, seq_len=32, n_samples=5, seed=0)
    assert [p.name for p in paths] == sorted(p.name for p in paths) and len(paths) == 5
    feeds = load_calibration_dir(tmp_path / "c")
    ids = np.asarray(whisper_tokenizer(text, add_special_tokens=False)["input_ids"])
    starts = set()
    for feed in feeds:
        inputs, labels = split_labels(feed)
        assert set(inputs) == {"input_ids"}
        x = inputs["input_ids"]
        assert x.shape == (1, 32) and x.dtype == np.int64 and labels.dtype == np.int64
        assert np.array_equal(labels[0, :-1], x[0, 1:]) and labels[0, -1] == IGNORE_INDEX
        hits = [s for s in range(0, ids.size - 31, 32) if np.array_equal(ids[s:s + 32], x[0])]
        assert hits, "each window is an aligned chunk of the tokenized text"
        starts.add(hits[0])
    assert len(starts) == 5  # disjoint
    # deterministic bytes for a seed, another sample for another seed
    again = write_text_calibration(tmp_path / "d", whisper_tokenizer, text, seq_len=32, n_samples=5, seed=0)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))
    other = load_calibration_dir(
        write_text_calibration(tmp_path / "e", whisper_tokenizer, text, seq_len=32, n_samples=5, seed=1)[0].parent)
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(feeds, other))
    # rewriting the same directory replaces the earlier feeds; custom input name
    write_text_calibration(tmp_path / "c", CharTokenizer(), "abcdefgh" * 10, seq_len=8, n_samples=2, input_name="ids")
    rewritten = load_calibration_dir(tmp_path / "c")
    assert len(rewritten) == 2 and set(rewritten[0]) == {"ids", "labels"}


def test_write_text_calibration_errors(tmp_path):
    with pytest.raises(CalibrationError, match="fewer than the 4"):
        write_text_calibration(tmp_path / "a", CharTokenizer(), "x" * 30, seq_len=10, n_samples=4)
    (tmp_path / "b").mkdir()
    write_feed(tmp_path / "b" / "other.npz", {"input_ids": np.zeros((1, 4), np.int64)})
    with pytest.raises(CalibrationError, match="already holds other calibration files"):
        write_text_calibration(tmp_path / "b", CharTokenizer(), "x" * 100, seq_len=10, n_samples=2)


def test_load_calibration_dir_errors(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration_dir(tmp_path / "missing")
    (tmp_path / "f.npz").write_bytes(b"")
    with pytest.raises(CalibrationError, match="directory"):
        load_calibration_dir(tmp_path / "f.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no feeds here")
    with pytest.raises(CalibrationError, match="no .npz"):
        load_calibration_dir(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    write_feed(bad / "a.npz", {"x": np.ones(2)})
    (bad / "b.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(CalibrationError, match="cannot be read"):
        load_calibration_dir(bad)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_feed(mixed / "a.npz", {"x": np.ones(2)})
    write_feed(mixed / "b.npz", {"x": np.ones(2), "y": np.ones(2)})
    with pytest.raises(CalibrationError, match="same graph inputs"):
        load_calibration_dir(mixed)
    float_labels = tmp_path / "fl"
    float_labels.mkdir()
    write_feed(float_labels / "a.npz", {"x": np.ones(2), "labels": np.ones(2)})
    with pytest.raises(CalibrationError, match="integers"):
        load_calibration_dir(float_labels)


def test_load_calibration_dir_sorted_order_and_split(tmp_path):
    for name, value in (("b.npz", 2), ("a.npz", 1), ("c.npz", 3)):
        write_feed(tmp_path / name, {"x": np.full((1, 2), value, np.int64)})
    feeds = load_calibration_dir(tmp_path)
    assert [int(f["x"][0, 0]) for f in feeds] == [1, 2, 3]
    rest, labels = split_labels(feeds[0])
    assert labels is None and set(rest) == {"x"}
    rest, labels = split_labels({"x": np.ones(1), "labels": np.array([3])})
    assert set(rest) == {"x"} and labels.tolist() == [3]


def test_read_novel(tmp_path, monkeypatch):
    emma = read_novel("emma")
    assert emma.startswith("EMMA") and len(emma) > 800_000 and "Woodhouse" in emma
    assert read_novel("emma.txt") == emma
    with pytest.raises(InputError, match="not found"):
        read_novel("ulysses")
    (tmp_path / "austen").mkdir()
    (tmp_path / "austen" / "x.txt").write_text(
        "The Project Gutenberg eBook\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nBody text.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicense\n")
    monkeypatch.setenv("MGVQ_DATA_DIR", str(tmp_path))
    assert read_novel("x") == "Body text."


def _tiny_llava_processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="full", image_token="<image>", num_additional_image_tokens=0)


def test_write_image_prompt_calibration(tmp_path):
    from mgvq_compile.models.whisper_ct2 import load_whisper_tokenizer

    tokenizer = load_whisper_tokenizer()  # a private copy: the processor adds a token to it
    processor = _tiny_llava_processor(tokenizer)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    pairs = [(image, "USER: <image>\nWhat is it? ASSISTANT:", " A cat."),
             (image, "USER: <image>\nColour? ASSISTANT:", " Grey and white stripes.")]
    write_image_prompt_calibration(tmp_path / "a", processor, pairs, max_length=32)
    feeds = load_calibration_dir(tmp_path / "a")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for feed, (_, prompt, answer) in zip(feeds, pairs):
        assert set(feed) == {"input_ids", "attention_mask", "pixel_values", "labels", "token_modality"}
        ids, labels, mask = feed["input_ids"][0], feed["labels"][0], feed["attention_mask"][0]
        assert ids.shape == (32,) and feed["pixel_values"].shape == (1, 3, 28, 28)
        assert feed["token_modality"][0].sum() == 4 and (ids[feed["token_modality"][0] == 1] == image_id).all()
        targets = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(targets, skip_special_tokens=True) == answer
        assert targets[-1] == tokenizer.eos_token_id  # the end after the answer is a target too
        first = int(np.nonzero(labels != IGNORE_INDEX)[0][0])
        assert np.array_equal(labels[first:first + targets.size], ids[first + 1:first + 1 + targets.size])
        assert mask.sum() == first + 1 + targets.size and (mask[mask.sum():] == 0).all()
    write_image_prompt_calibration(tmp_path / "b", processor, pairs[:1],
                                   input_names={"input_ids": "ids", "pixel_values": "image"})
    assert set(load_calibration_dir(tmp_path / "b")[0]) == {"ids", "image", "labels", "token_modality"}
    with pytest.raises(CalibrationError, match="exceeds max_length"):
        write_image_prompt_calibration(tmp_path / "c", processor, pairs, max_length=8)
    with pytest.raises(CalibrationError, match="has no"):
        write_image_prompt_calibration(tmp_path / "d", processor, pairs, input_names={"image_sizes": "s"})


def test_write_speech_calibration(tmp_path, whisper_tokenizer):
    from mgvq_compile.models.whisper_ct2 import whisper_feature_extractor

    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    audios = [(0.1 * np.sin(2 * np.pi * f * t)).astype(np.float32) for f in (220.0, 330.0)]
    sentences = ["Hello there.", "A second, longer sentence."]
    write_speech_calibration(tmp_path / "s", whisper_feature_extractor(), whisper_tokenizer, sentences,
                             decoder_len=16, audios=audios)
    feeds = load_calibration_dir(tmp_path / "s")
    for feed, sentence in zip(feeds, sentences):
        assert feed["input_features"].shape == (1, 80, 3000) and feed["input_features"].dtype == np.float32
        ids, labels = feed["decoder_input_ids"][0], feed["labels"][0]
        assert ids.shape == (16,) and ids[:2].tolist() == [50257, 50362]
        assert labels[0] == IGNORE_INDEX  # the forced <|notimestamps|> is no target
        targets = labels[labels != IGNORE_INDEX]
        assert whisper_tokenizer.decode(targets, skip_special_tokens=True) == sentence and targets[-1] == 50256
        assert np.array_equal(labels[1:1 + targets.size], ids[2:2 + targets.size])
    assert not np.array_equal(feeds[0]["input_features"], feeds[1]["input_features"])
    with pytest.raises(CalibrationError, match="more than decoder_len"):
        write_speech_calibration(tmp_path / "t", whisper_feature_extractor(), whisper_tokenizer, sentences,
                                 decoder_len=4, audios=audios)
    with pytest.raises(CalibrationError, match="audios for"):
        write_speech_calibration(tmp_path / "u", whisper_feature_extractor(), whisper_tokenizer, sentences,
                                 decoder_len=16, audios=audios[:1])


def test_resample_keeps_frequency_and_length():
    src = 22050
    t = np.arange(src) / src
    x = np.sin(2 * np.pi * 440.0 * t)
    y = resample(x, src, SAMPLE_RATE)
    assert y.dtype == np.float32 and y.size == SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 s of signal: bins are 1 Hz
    mid = y[1000:-1000]
    assert np.allclose(mid, np.sin(2 * np.pi * 440.0 * (np.arange(SAMPLE_RATE) / SAMPLE_RATE))[1000:-1000], atol=2e-3)
    # a tone above the new Nyquist is removed, not aliased
    high = resample(np.sin(2 * np.pi * 10000.0 * t), src, SAMPLE_RATE)
    assert np.abs(high[1000:-1000]).max() < 0.05


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_synthesize_speech(tmp_path):
    from mgvq_compile.calibration.speech import read_wav

    audio = synthesize_speech("Good morning.", tmp_path / "a.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1 and 0.6 * SAMPLE_RATE < audio.size < 4 * SAMPLE_RATE
    assert np.abs(audio).max() > 0.05 and np.abs(audio[: SAMPLE_RATE // 4]).max() == 0  # leading silence
    back, rate = read_wav((tmp_path / "a.wav").read_bytes())
    assert rate == SAMPLE_RATE and np.allclose(back, audio, atol=1e-4)
    assert np.array_equal(synthesize_speech("Good morning."), audio)


def test_wer():
    assert wer("the cat sat", "the cat sat") == 0.0
    assert wer("the cat sat", "the bat sat") == pytest.approx(1 / 3)
    assert wer("The cat, sat!", "the cat sat") == 0.0
    assert wer("a b c d", "a c d e f") == pytest.approx(3 / 4)  # one deletion, two insertions
    assert word_errors("", "") == (0, 0) and wer("", "") == 0.0 and wer("", "x") == 1.0
    assert normalize_transcript("Twenty-one, isn't it?") == ["twenty", "one", "isn't", "it"]


def _levenshtein(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_levenshtein(a[1:], b) + 1, _levenshtein(a, b[1:]) + 1, _levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


def test_word_edits_split_the_distance_by_kind():
    assert word_edits("a b c d", "a c d e f") == WordEdits(substitutions=0, deletions=1, insertions=2, reference_words=4)
    assert word_edits("the cat sat", "the bat sat") == WordEdits(1, 0, 0, 3)
    assert word_edits("the cat sat on the mat", "you") == WordEdits(1, 5, 0, 6)  # a near-empty transcript
    assert word_edits("yes", "yes yes yes yes") == WordEdits(0, 0, 3, 1)  # a loop
    assert word_edits("", "") == WordEdits(0, 0, 0, 0) and word_edits("", "x y") == WordEdits(0, 0, 2, 0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        ref, hyp = (" ".join(rng.choice(list("abc"), size=rng.integers(0, 7))) for _ in range(2))
        edits = word_edits(ref, hyp)
        assert edits.errors == word_errors(ref, hyp)[0] == _levenshtein(ref.split(), hyp.split())
        # Every reference word is matched, substituted or deleted; every hypothesis word matched,
        # substituted or inserted.
        assert edits.reference_words - edits.deletions == len(hyp.split()) - edits.insertions >= edits.substitutions
        assert edits.hypothesis_words == len(hyp.split())


def test_novel_sentences_are_seeded_clean_and_bounded():
    from mgvq_compile.calibration.data import novel_sentences

    text = read_novel("sense_and_sensibility")
    first = novel_sentences(text, 12, seed=3)
    assert first == novel_sentences(text, 12, seed=3) and first != novel_sentences(text, 12, seed=4)
    for sentence in first:
        assert 6 <= len(sentence.split()) <= 20 and sentence[0].isupper() and sentence[-1] in ".!?"
        assert '"' not in sentence and "\n" not in sentence
    with pytest.raises(CalibrationError, match="usable sentences"):
        novel_sentences("Too short. Also short.", 1, seed=0)
