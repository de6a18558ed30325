"""The numpy log-mel front end: a pure tone must light up the mel band that holds its frequency."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from xmr.data.sources.audio import (MelParams, fix_frames, log_mel, mel_band_centres, mel_filterbank, read_wav,
                                    resample, trim_silence)

pytestmark = pytest.mark.timeout(60)


def _tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_tone_peaks_in_its_mel_band(freq: float) -> None:
    p = MelParams()
    feat = log_mel(_tone(freq, 1.2, p.sample_rate), p)
    assert feat.shape == (p.n_frames, p.n_mels) and feat.dtype == np.float32
    peak_band = int(np.bincount(feat.argmax(axis=1)).argmax())
    expected = int(np.abs(mel_band_centres(p) - freq).argmin())
    assert abs(peak_band - expected) <= 1, (peak_band, expected)


def test_filterbank_covers_range_and_is_triangular() -> None:
    p = MelParams(n_mels=20)
    fb = mel_filterbank(p)
    assert fb.shape == (20, p.n_fft // 2 + 1)
    assert fb.min() >= 0 and fb.max() <= 1 + 1e-6
    assert (fb.sum(axis=1) > 0).all(), "every band must cover at least one FFT bin"
    centres = mel_band_centres(p)
    assert np.all(np.diff(centres) > 0) and centres[0] > p.f_min and centres[-1] < p.f_max


def test_short_input_is_padded_and_long_cropped() -> None:
    p = MelParams(n_frames=10)
    silence_level = np.log(p.log_floor)
    short = log_mel(_tone(1000, 0.05, p.sample_rate), p)
    assert short.shape == (10, p.n_mels)
    assert np.allclose(short[-1], silence_level), "frames past the signal are padded at the silence level"
    assert log_mel(_tone(1000, 2.0, p.sample_rate), p).shape == (10, p.n_mels)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert np.array_equal(fix_frames(x, 2, 0.0), x[2:4])


def test_window_samples_give_exactly_n_frames() -> None:
    p = MelParams()
    from xmr.data.sources.audio import power_spectrogram

    assert power_spectrogram(np.zeros(p.window_samples(), np.float32), p).shape[0] == p.n_frames


def test_read_wav_resample_and_trim(tmp_path: Path) -> None:
    rate = 22050
    x = np.concatenate([np.zeros(rate // 2), _tone(440, 0.5, rate), np.zeros(rate // 2)])
    path = tmp_path / "t.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    y, r = read_wav(path)
    assert r == rate and y.shape == x.shape and np.abs(y - x).max() < 1e-3
    z = resample(y, rate, 16000)
    assert abs(z.size - x.size * 16000 / rate) <= 1
    trimmed = trim_silence(z)
    assert abs(trimmed.size - 8000) < 600, trimmed.size   # the 0.5 s tone at 16 kHz, to a frame
