"""Synthetic speech with a known transcript: Debian's ``espeak-ng``, resampled to 16 kHz in numpy."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from mgvq_compile.errors import InputError

__all__ = ["SAMPLE_RATE", "espeak_available", "synthesize_speech", "resample", "read_wav"]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` executable is on PATH."""
    return shutil.which("espeak-ng") is not None


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the rate of a 16-bit PCM WAV held in memory."""
    with wave.open(io.BytesIO(data)) as wav:
        if wav.getsampwidth() != 2:
            raise InputError(f"expected 16-bit PCM WAV, got {8 * wav.getsampwidth()}-bit")
        rate, channels = wav.getframerate(), wav.getnchannels()
        frames = wav.readframes(wav.getnframes())
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples, rate


def resample(x: np.ndarray, src_rate: int, dst_rate: int, *, half_width: int = 32) -> np.ndarray:
    """Band-limited (Hann-windowed sinc) resampling of a 1-D signal; deterministic, numpy only."""
    x = np.asarray(x, dtype=np.float64)
    if src_rate == dst_rate or x.size == 0:
        return x.astype(np.float32)
    n_out = int(np.floor(x.size * dst_rate / src_rate))
    cutoff = min(1.0, dst_rate / src_rate)  # low-pass at the lower Nyquist, in units of the input rate
    t = np.arange(n_out) * (src_rate / dst_rate)
    out = np.zeros(n_out)
    base = np.floor(t).astype(np.int64)
    for k in range(-half_width + 1, half_width + 1):
        idx = base + k
        d = t - idx
        w = cutoff * np.sinc(cutoff * d) * (0.5 + 0.5 * np.cos(np.pi * np.clip(d / half_width, -1, 1)))
        valid = (idx >= 0) & (idx < x.size)
        out[valid] += w[valid] * x[idx[valid]]
    return out.astype(np.float32)


def synthesize_speech(text: str, path: str | os.PathLike | None = None, *, voice: str = "en-us",
                      speed_wpm: int = 175, lead_silence_s: float = 0.5) -> np.ndarray:
    """Speak ``text`` with espeak-ng; returns 16 kHz mono float32 (and writes a 16 kHz WAV to ``path`` if given).

    ``lead_silence_s`` of silence go before the speech: without it Whisper tends to miss the first word.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise InputError("espeak-ng is not installed, so no speech can be synthesized",
                         "apt-get update && apt-get install -y espeak-ng")
    proc = subprocess.run([exe, "--stdout", "-v", voice, "-s", str(speed_wpm), text],
                          capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise InputError(f"espeak-ng failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[:300]}")
    # espeak-ng streams a WAV whose header sizes are 0xFFFFFFFF: fix them before parsing.
    data = bytearray(proc.stdout)
    if data[:4] == b"RIFF":
        data[4:8] = (len(data) - 8).to_bytes(4, "little")
        data[40:44] = (len(data) - 44).to_bytes(4, "little")
    samples, rate = read_wav(bytes(data))
    audio = resample(samples, rate, SAMPLE_RATE)
    audio = np.concatenate([np.zeros(int(round(lead_silence_s * SAMPLE_RATE)), dtype=np.float32), audio])
    if path is not None:
        pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
        with wave.open(str(Path(path)), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            wav.writeframes(pcm.tobytes())
    logger.debug("synthesized %.2f s of speech for %r", audio.size / SAMPLE_RATE, text[:40])
    return audio
