"""Synthetic spoken keywords as raw 16 kHz audio (the offline stand-in for Speech Commands, which no package ships).

Each clip is one keyword spoken by espeak-ng (Debian `espeak-ng`, GPL-3) with a random English voice and voice
variant, speed (120-220 words per minute) and pitch (20-80), converted from espeak's 22,050 Hz to 16 kHz, placed at a
random offset in a 1 s window, scaled to a random peak level and mixed with white noise at a random level. Classes
are the first `num_words` of `SC_WORDS` (the 10 Speech Commands words yes ... go by default, up to all 35).

Columns: `values` (float32, 16,000 samples in [-1, 1]; input_dim 1), `label` (ClassLabel named after the words),
`length`. Classes are balanced in every split. Synthesis takes about 20 ms per clip.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
from tqdm.auto import tqdm

from .common import (
    TaskSourceMissing,
    balanced_labels,
    cached,
    check_non_negative,
    check_positive,
    classification_split,
    split_sizes,
)

INSTALL_HINT = "apt-get install espeak-ng"
SAMPLE_RATE = 16_000
SC_WORDS = (
    "yes",
    "no",
    "up",
    "down",
    "left",
    "right",
    "on",
    "off",
    "stop",
    "go",  # the 10 SC10 commands
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "bed",
    "bird",
    "cat",
    "dog",
    "happy",
    "house",
    "marvin",
    "sheila",
    "tree",
    "wow",
    "backward",
    "forward",
    "follow",
    "learn",
    "visual",
)
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+f1", "+f2", "+f3", "+f4", "+klatt", "+whisper")


def espeak_path() -> str | None:
    """The espeak-ng executable, or None."""
    return shutil.which("espeak-ng")


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM mono WAV bytes -> (int16 samples, sample rate). espeak-ng writes its WAV to a pipe and cannot seek
    back to fill in the sizes (they read 0x7FFFFFFF), so the `data` chunk is taken to run to the end of the bytes
    (the stdlib `wave` module trusts the header and would fail)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("Not a WAV file.")
    position, rate, bits, channels = 12, None, None, None
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        body = position + 8
        if chunk == b"fmt ":
            channels = int.from_bytes(data[body + 2 : body + 4], "little")
            rate = int.from_bytes(data[body + 4 : body + 8], "little")
            bits = int.from_bytes(data[body + 14 : body + 16], "little")
        elif chunk == b"data":
            if rate is None or bits != 16 or channels != 1:
                raise ValueError(f"Expected 16-bit mono PCM, got {bits} bits x {channels} channels.")
            payload = data[body : min(len(data), body + size)]
            return np.frombuffer(payload[: len(payload) // 2 * 2], dtype="<i2").copy(), rate
        position = body + size + (size & 1)
    raise ValueError("WAV without a data chunk.")


def synthesize(word: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """Speak `word` with espeak-ng: (int16 samples, sample rate); raises TaskSourceMissing without espeak-ng."""
    executable = espeak_path()
    if executable is None:
        raise TaskSourceMissing(f"espeak-ng is not installed: run `{INSTALL_HINT}` (Debian/Ubuntu).")
    result = subprocess.run(
        [executable, "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), word],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return parse_wav(result.stdout)


def resample(samples: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample float samples from `source_rate` to `target_rate` Hz: a windowed-sinc low-pass at 0.45 x the lower
    rate (against aliasing when downsampling), then linear interpolation onto the new time grid."""
    if source_rate == target_rate:
        return samples.astype(np.float32)
    cutoff = 0.45 * min(source_rate, target_rate) / source_rate  # in cycles per input sample
    taps = np.arange(-32, 33)
    kernel = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps))
    filtered = np.convolve(samples, kernel / kernel.sum(), mode="same")
    duration = len(samples) / source_rate
    times = np.arange(round(duration * target_rate)) / target_rate
    return np.interp(times, np.arange(len(samples)) / source_rate, filtered).astype(np.float32)


def postprocess(
    samples: np.ndarray,
    source_rate: int,
    rng: np.random.Generator,
    clip_samples: int = SAMPLE_RATE,
    noise_range=(0.0, 0.02),
    peak_range=(0.3, 0.9),
    silence_threshold: float = 0.01,
) -> np.ndarray:
    """int16 speech at `source_rate` -> a float32 clip of `clip_samples` samples at 16 kHz in [-1, 1].

    Trims the leading/trailing silence espeak adds (|x| < silence_threshold of the peak), resamples, scales the
    peak to a random level in `peak_range`, places the word at a random offset (centre-cropped if longer than the
    clip) and adds white noise with a random standard deviation in `noise_range`."""
    audio = samples.astype(np.float32) / 32768.0
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > 0:
        loud = np.flatnonzero(np.abs(audio) >= silence_threshold * peak)
        audio = audio[loud[0] : loud[-1] + 1]
    audio = resample(audio, source_rate)
    if audio.size and np.abs(audio).max() > 0:
        audio = audio * (rng.uniform(*peak_range) / np.abs(audio).max())
    if len(audio) > clip_samples:
        start = (len(audio) - clip_samples) // 2
        audio = audio[start : start + clip_samples]
    clip = np.zeros(clip_samples, dtype=np.float32)
    offset = int(rng.integers(clip_samples - len(audio) + 1))
    clip[offset : offset + len(audio)] = audio
    clip += rng.normal(0.0, rng.uniform(*noise_range), clip_samples).astype(np.float32)
    return np.clip(clip, -1.0, 1.0)


def generate_speech(seed, num_words, clips_per_word_train, clips_per_word_validation, clips_per_word_test):
    """The three splits without caching (see `speech_keywords`)."""
    from datasets import DatasetDict

    rng = np.random.default_rng(seed)
    words = SC_WORDS[:num_words]
    sizes = split_sizes(
        clips_per_word_train * num_words, clips_per_word_validation * num_words, clips_per_word_test * num_words
    )
    splits = {}
    with tqdm(total=sum(sizes.values()), desc="speech", unit="clip", leave=False, mininterval=1.0) as bar:
        for split, size in sizes.items():
            labels = balanced_labels(rng, size, num_words)
            clips = np.zeros((size, SAMPLE_RATE), dtype=np.float32)
            for i, label in enumerate(labels):
                voice = VOICES[rng.integers(len(VOICES))] + VARIANTS[rng.integers(len(VARIANTS))]
                speed, pitch = int(rng.integers(120, 221)), int(rng.integers(20, 81))
                samples, rate = synthesize(words[label], voice, speed, pitch)
                clips[i] = postprocess(samples, rate, rng)
                bar.update(1)
            splits[split] = classification_split("values", clips, labels, words, np.float32)
    return DatasetDict(splits)


def speech_keywords(
    seed: int = 0,
    cache_dir=None,
    *,
    num_words: int = 10,
    clips_per_word_train: int = 50,
    clips_per_word_validation: int = 10,
    clips_per_word_test: int = 10,
):
    """Spoken-keyword classification from raw 16 kHz audio as a cached `DatasetDict` (see the module docstring).
    Raises `TaskSourceMissing` (install `espeak-ng`) when espeak-ng is not on PATH."""
    check_positive(num_words=num_words)
    if num_words > len(SC_WORDS) or num_words < 2:
        raise ValueError(f"`num_words` must be in [2, {len(SC_WORDS)}], got {num_words}.")
    check_positive(clips_per_word_train=clips_per_word_train)
    check_non_negative(clips_per_word_validation=clips_per_word_validation, clips_per_word_test=clips_per_word_test)
    if espeak_path() is None:
        raise TaskSourceMissing(f"espeak-ng is not installed: run `{INSTALL_HINT}` (Debian/Ubuntu).")
    arguments = {
        "seed": seed,
        "num_words": num_words,
        "clips_per_word_train": clips_per_word_train,
        "clips_per_word_validation": clips_per_word_validation,
        "clips_per_word_test": clips_per_word_test,
    }
    return cached("speech", arguments, cache_dir, lambda: generate_speech(**arguments))
