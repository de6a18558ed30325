"""Log-mel audio features in plain numpy (STFT -> mel filterbank -> log).

Written here rather than taken from an audio library so the avdigits build depends on
nothing beyond numpy/scipy and its feature parameters are fully recorded in the manifest.
Mel scale: the HTK formula ``2595 * log10(1 + f / 700)`` with triangular filters.
"""

from __future__ import annotations

import wave
from math import gcd
from pathlib import Path

import numpy as np
from xmr.data.sources.configs import MelParams  # noqa: F401 (re-exported)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate, via the stdlib ``wave`` module."""
    with wave.open(str(path), "rb") as w:
        n_ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    if width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{path}: unsupported WAV sample width {width} bytes (expected 1, 2 or 4)")
    if n_ch > 1:
        x = x.reshape(-1, n_ch).mean(axis=1)
    return x, rate


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) between integer rates, e.g. espeak's 22050 -> 16000."""
    if rate_in == rate_out:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = gcd(rate_in, rate_out)
    return resample_poly(x, rate_out // g, rate_in // g).astype(np.float32)


def trim_silence(x: np.ndarray, threshold_db: float = -40.0, frame: int = 256) -> np.ndarray:
    """Cut leading/trailing frames whose RMS is ``threshold_db`` below the loudest frame."""
    if x.size == 0:
        return x
    n = int(np.ceil(x.size / frame))
    padded = np.zeros(n * frame, dtype=np.float32)
    padded[: x.size] = x
    rms = np.sqrt((padded.reshape(n, frame) ** 2).mean(axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(rms / rms.max()) > threshold_db)[0]
    return x[loud[0] * frame: min(x.size, (loud[-1] + 1) * frame)]


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(p: MelParams) -> np.ndarray:
    """``[n_mels, n_fft//2+1]`` triangular filters, equally spaced on the mel scale."""
    n_bins = p.n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, p.sample_rate / 2, n_bins)
    edges = mel_to_hz(np.linspace(hz_to_mel(p.f_min), hz_to_mel(p.f_max), p.n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_freqs[None, :] - lower) / (centre - lower)
    falling = (upper - fft_freqs[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def mel_band_centres(p: MelParams) -> np.ndarray:
    """Centre frequency (Hz) of each mel band, for reading features back."""
    return mel_to_hz(np.linspace(hz_to_mel(p.f_min), hz_to_mel(p.f_max), p.n_mels + 2))[1:-1]


def power_spectrogram(x: np.ndarray, p: MelParams) -> np.ndarray:
    """``[frames, n_fft//2+1]`` power of a Hann-windowed STFT without centring padding."""
    if x.size < p.n_fft:
        x = np.pad(x, (0, p.n_fft - x.size))
    n_frames = 1 + (x.size - p.n_fft) // p.hop_length
    idx = np.arange(p.n_fft)[None, :] + p.hop_length * np.arange(n_frames)[:, None]
    window = np.zeros(p.n_fft, dtype=np.float32)
    off = (p.n_fft - p.win_length) // 2
    window[off: off + p.win_length] = np.hanning(p.win_length + 2)[1:-1]   # periodic-ish, no zero ends
    spec = np.fft.rfft(x[idx] * window[None, :], axis=1)
    return (spec.real ** 2 + spec.imag ** 2).astype(np.float32)


def fix_frames(feat: np.ndarray, n_frames: int, pad_value: float) -> np.ndarray:
    """Pad (with ``pad_value``) or centre-crop ``[T, F]`` features to exactly ``n_frames`` rows."""
    t = feat.shape[0]
    if t >= n_frames:
        start = (t - n_frames) // 2
        return feat[start: start + n_frames]
    pad = np.full((n_frames - t, feat.shape[1]), pad_value, dtype=feat.dtype)
    return np.concatenate([feat, pad], axis=0)


def log_mel(x: np.ndarray, p: MelParams, fbank: np.ndarray | None = None) -> np.ndarray:
    """``[n_frames, n_mels]`` float32 log-mel features of a mono waveform at ``p.sample_rate``."""
    fb = mel_filterbank(p) if fbank is None else fbank
    mel = power_spectrogram(np.asarray(x, dtype=np.float32), p) @ fb.T
    feat = np.log(mel + p.log_floor).astype(np.float32)
    return fix_frames(feat, p.n_frames, float(np.log(p.log_floor)))
