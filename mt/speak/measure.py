"""How far apart two waveforms sound: the mean absolute difference of their log-mel spectrograms (80 HTK mel bands
of a 1024-point STFT, hop 256), over the frames both have."""

from __future__ import annotations

import numpy as np

N_FFT = 1024
HOP = 256
N_MELS = 80
FLOOR = 1e-5


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filters(sample_rate: int, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters, evenly spaced in mel from 0 to Nyquist."""
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """[frames, N_MELS] log mel power of `wav` (zero-padded to one frame if shorter)."""
    wav = np.asarray(wav, np.float64)
    if len(wav) < N_FFT:
        wav = np.pad(wav, (0, N_FFT - len(wav)))
    frames = np.lib.stride_tricks.sliding_window_view(wav, N_FFT)[::HOP] * np.hanning(N_FFT)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    return np.log(power @ mel_filters(sample_rate).T + FLOOR)


def log_mel_distance(a: np.ndarray, b: np.ndarray, sample_rate: int) -> float:
    x, y = log_mel(a, sample_rate), log_mel(b, sample_rate)
    n = min(len(x), len(y))
    return float(np.abs(x[:n] - y[:n]).mean())
