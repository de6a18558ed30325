"""Raw inputs the endpoint accepts where the dataset records how its features were made.

The audio-visual digits set stores log-mel parameters in its manifest (``source.details.mel``),
so a WAV file can be turned into the same [n_frames, n_mels] features as its audio side."""

from __future__ import annotations

import io
import wave
from typing import Any

import numpy as np

from xmr.data.manifest import Manifest
from xmr.serve.requests import RequestError

MAX_WAV_SECONDS = 30.0
# The rates and channel counts a WAV may state: the resampling filter's length grows with the
# ratio of the rates, so an absurd rate (1,000,003 Hz) would cost seconds of CPU and a GB.
WAV_RATES = (8000, 192000)
MAX_WAV_CHANNELS = 8


def audio_spec(manifest: Manifest) -> dict[str, Any] | None:
    """{"role", "mel"} for datasets built from audio (the modality a WAV becomes, and its
    log-mel parameters), else None: what the gateway's settings carry to featurise a WAV."""
    details = (manifest.source or {}).get("details", {}) if isinstance(manifest.source, dict) else {}
    mel = details.get("mel")
    if not mel:
        return None
    return {"role": next((r for r, m in manifest.modalities.items() if m.name == "audio"), "b"), "mel": dict(mel)}


def audio_featuriser(spec: dict[str, Any] | None):
    """(role, featurise(bytes) -> array) for an ``audio_spec``, or None without one."""
    if not spec:
        return None
    from xmr.data.sources.audio import MelParams, log_mel, mel_filterbank, resample, trim_silence

    params = MelParams(**spec["mel"])
    fbank = mel_filterbank(params)
    role = spec["role"]

    def featurise(data: bytes) -> np.ndarray:
        try:
            with wave.open(io.BytesIO(data), "rb") as w:
                n_ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
                if not WAV_RATES[0] <= rate <= WAV_RATES[1]:
                    raise RequestError(422, f"audio_wav_base64: sample rate {rate} Hz, expected "
                                            f"{WAV_RATES[0]}..{WAV_RATES[1]} Hz")
                if not 1 <= n_ch <= MAX_WAV_CHANNELS:
                    raise RequestError(422, f"audio_wav_base64: {n_ch} channels, expected 1..{MAX_WAV_CHANNELS}")
                if n == 0:
                    raise RequestError(422, "audio_wav_base64: the WAV file holds no samples")
                if n / rate > MAX_WAV_SECONDS:
                    raise RequestError(413, f"audio_wav_base64: {n / rate:.1f} s of audio, at most {MAX_WAV_SECONDS:.0f} s")
                raw = w.readframes(n)
        except (wave.Error, EOFError) as exc:
            raise RequestError(422, f"audio_wav_base64: not a readable PCM WAV file ({exc})") from None
        dtype = {1: np.uint8, 2: "<i2", 4: "<i4"}.get(width)
        if dtype is None:
            raise RequestError(422, f"audio_wav_base64: unsupported sample width {width} bytes (1, 2 or 4)")
        whole = len(raw) - len(raw) % (width * n_ch)
        if whole == 0:
            raise RequestError(422, "audio_wav_base64: the WAV file holds no complete sample frame")
        x = np.frombuffer(raw[:whole], dtype=dtype).astype(np.float32)
        x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
        if n_ch > 1:
            x = x.reshape(-1, n_ch).mean(axis=1)
        x = trim_silence(resample(x, rate, params.sample_rate))
        x = x / max(float(np.abs(x).max()), 1e-6) * 0.6
        window = params.window_samples()
        if len(x) >= window:
            start = (len(x) - window) // 2
            x = x[start:start + window]
        else:
            pad = window - len(x)
            x = np.pad(x, (pad // 2, pad - pad // 2))
        return log_mel(x, params, fbank).astype(np.float32)

    return role, featurise
