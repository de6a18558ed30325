"""avdigits: a small real audio-visual category dataset built offline.

Modality ``a`` (image): scikit-learn's bundled handwritten digits (``load_digits``, 1,797
8x8 images), stored as the 64 pixel values scaled to [0, 1] (shape ``[64]``; a flat vector
suits the MLP encoders and keeps the dataset small). Modality ``b`` (audio): the digit's
English word spoken by ``espeak-ng`` with a voice/variant, speed and pitch drawn per sample,
resampled to 16 kHz, silence-trimmed, randomly gained and shifted in a fixed ~1 s window,
mixed with white noise at a random SNR, and turned into ``[n_frames, n_mels]`` log-mel
features by ``xmr.data.sources.audio``. Label = the digit. Splits are seeded and stratified.
Everything that shaped the features is recorded in the manifest's ``source.details``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xmr.data.manifest import LabelSpec, Manifest, ModalitySpec
from xmr.data.sources.audio import log_mel, mel_filterbank, read_wav, resample, trim_silence
from xmr.data.sources.features import stratified_split
from xmr.data.writer import DatasetWriter
from xmr.data.sources.configs import AvdigitsConfig, DIGIT_WORDS  # noqa: F401 (re-exported)

ESPEAK_MISSING = "espeak-ng not installed: apt-get install espeak-ng (make setup does this)"


def espeak_version() -> str:
    """``espeak-ng --version`` first line; a clear error when the program is missing."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(ESPEAK_MISSING)
    return subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def synthesise(word: str, voice: str, speed: int, pitch: int, tmpdir: str) -> tuple[np.ndarray, int]:
    """Speak ``word`` with espeak-ng into a WAV file and read it back (mono float32, rate)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(ESPEAK_MISSING)
    path = Path(tmpdir) / f"{word}-{voice.replace('+', '_')}-{speed}-{pitch}.wav"
    r = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word],
                       capture_output=True, text=True)
    if r.returncode != 0 or not path.is_file():
        raise RuntimeError(f"espeak-ng failed for voice={voice!r} speed={speed} pitch={pitch} word={word!r}: "
                           f"{r.stderr.strip() or r.returncode}")
    return read_wav(path)


def place_in_window(x: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Put ``x`` at a random offset in a zero window of ``length`` samples (centre-crop if longer)."""
    if x.size >= length:
        start = (x.size - length) // 2
        return x[start: start + length].copy()
    out = np.zeros(length, dtype=np.float32)
    off = int(rng.integers(0, length - x.size + 1))
    out[off: off + x.size] = x
    return out


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` relative to the power of the non-silent part of ``x``."""
    active = x[np.abs(x) > 1e-4]
    p_signal = float((active ** 2).mean()) if active.size else 1e-6
    sigma = np.sqrt(p_signal / 10 ** (snr_db / 10))
    return (x + rng.normal(0, sigma, x.size)).astype(np.float32)


def select_images(cfg: AvdigitsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chosen sklearn indices, images ``[N, 64]`` in [0, 1] and digit labels, seeded."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, target = digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    rng = np.random.default_rng(cfg.seed)
    chosen = []
    for c in range(len(DIGIT_WORDS)):
        idx = rng.permutation(np.nonzero(target == c)[0])
        chosen.extend(idx[: cfg.per_class].tolist() if cfg.per_class else idx.tolist())
    chosen_arr = np.array(sorted(chosen), dtype=np.int64)
    if cfg.limit is not None and cfg.limit < chosen_arr.size:
        keep = stratified_split(target[chosen_arr], {"rest": 1 - cfg.limit / chosen_arr.size,
                                                     "keep": cfg.limit / chosen_arr.size}, cfg.seed)["keep"]
        chosen_arr = chosen_arr[keep]
    return chosen_arr, images[chosen_arr], target[chosen_arr]


def audio_features(labels: np.ndarray, cfg: AvdigitsConfig, progress: bool = True) -> np.ndarray:
    """``[N, n_frames, n_mels]`` log-mel features of one synthesised utterance per label."""
    rng = np.random.default_rng([cfg.seed, 1])
    fb = mel_filterbank(cfg.mel)
    window = cfg.mel.window_samples()
    cache: dict[tuple, np.ndarray] = {}
    out = np.zeros((labels.size, cfg.mel.n_frames, cfg.mel.n_mels), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="xmr-avdigits-") as tmp:
        for i, c in enumerate(tqdm(labels, desc="avdigits audio", disable=not progress)):
            recipe = (DIGIT_WORDS[int(c)], cfg.voices[int(rng.integers(len(cfg.voices)))],
                      cfg.speeds[int(rng.integers(len(cfg.speeds)))], cfg.pitches[int(rng.integers(len(cfg.pitches)))])
            if recipe not in cache:
                x, rate = synthesise(*recipe, tmp)
                x = trim_silence(resample(x, rate, cfg.mel.sample_rate))
                cache[recipe] = x / max(float(np.abs(x).max()), 1e-6)
            x = cache[recipe] * rng.uniform(*cfg.gain)
            x = add_noise(place_in_window(x, window, rng), float(rng.uniform(*cfg.snr_db)), rng)
            out[i] = log_mel(x, cfg.mel, fb)
    return out


def build_avdigits(out: str, cfg: AvdigitsConfig | None = None, *, name: str = "avdigits",
                   samples_per_shard: int = 256, overwrite: bool = False, endpoint_url: str | None = None,
                   progress: bool = True) -> Manifest:
    """Build the dataset at ``out``; fails with an install hint when espeak-ng is missing."""
    cfg = cfg or AvdigitsConfig()
    cfg.validate()
    version = espeak_version()
    src_idx, images, labels = select_images(cfg)
    audio = audio_features(labels, cfg, progress)
    parts = stratified_split(labels, cfg.fractions, cfg.seed)
    details = {**asdict(cfg), "espeak_ng_version": version, "image": "sklearn load_digits 8x8, pixels / 16, flat [64]",
               "audio": "espeak-ng word -> resample -> trim -> gain -> random shift -> white noise -> log-mel",
               "sample_id": "digits-NNNN = row NNNN of sklearn load_digits"}
    w = DatasetWriter(out, name=name, task="category",
                      modalities={"a": ModalitySpec("image", [images.shape[1]], cfg.dtype),
                                  "b": ModalitySpec("audio", [cfg.mel.n_frames, cfg.mel.n_mels], cfg.dtype)},
                      labels=LabelSpec("single", [len(DIGIT_WORDS)], names=[list(DIGIT_WORDS)]),
                      source={"kind": "avdigits", "details": details}, samples_per_shard=samples_per_shard,
                      overwrite=overwrite, endpoint_url=endpoint_url)
    for split, ix in parts.items():
        with w.split(split) as s:
            for i, j in enumerate(ix):
                s.write(f"{split}-{i:06d}", arrays={"a": images[j], "b": audio[j]},
                        meta={"index": i, "id": f"digits-{int(src_idx[j]):04d}", "label": int(labels[j])})
    return w.finish()
