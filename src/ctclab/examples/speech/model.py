"""A small character CTC acoustic model: waveform -> log-mel -> convolutions (2x down) -> BiLSTM -> classes.

``(B, N)`` float32 waveform at 16 kHz -> ``(B, T, C)`` logits, one frame per
:attr:`AcousticCNNLSTM.samples_per_frame` = 320 samples (20 ms): frame ``t`` is centred on
sample ``320 t`` (10 ms STFT hop, ``center=True``, then a stride-2 convolution). Features are
computed in PyTorch (``torch.stft`` and a triangular mel filterbank built here, HTK mel scale),
so the model needs nothing beyond torch. :func:`build` is the factory a ctclab model folder
names (``ctclab.examples.speech.model:build``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: the model's classes: blank, the word delimiter, then the letters (class id = index)
VOCABULARY = ("<blank>", "|") + tuple("abcdefghijklmnopqrstuvwxyz")
BLANK = 0
WORD_DELIMITER = "|"


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 20.0, f_max: float | None = None) -> Tensor:
    """``(n_fft // 2 + 1, n_mels)`` triangular filters, equally spaced on the HTK mel scale
    ``m = 2595 log10(1 + f / 700)``, each peaking at 1 (the librosa/torchaudio ``norm=None`` filters)."""
    f_max = f_max or sample_rate / 2
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    mels = torch.linspace(mel(f_min), mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)[:, None]
    lower, centre, upper = hz[:-2], hz[1:-1], hz[2:]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """``(B, N)`` waveform -> ``(B, n_mels, N // hop + 1)`` log-mel energies (25 ms Hann window,
    ``hop`` samples between frames, ``center=True``)."""

    def __init__(self, sample_rate: int = 16_000, n_fft: int = 400, hop: int = 160, n_mels: int = 64):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(n_mels, n_fft, sample_rate), persistent=False)

    def forward(self, waveform: Tensor) -> Tensor:
        spec = torch.stft(waveform, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (B, F, frames)
        return torch.log(torch.einsum("bft,fm->bmt", power, self.filters) + 1e-6)


class AcousticCNNLSTM(nn.Module):
    """Log-mel (10 ms hop) -> two 1-D convolutions (the second of stride 2: 20 ms frames) ->
    a ``layers``-layer BiLSTM -> a linear layer to ``num_classes`` logits.

    ``forward(waveform (B, N)) -> (B, T, C)`` logits with ``T = frames(N)``; :meth:`frames`
    maps sample counts to frame counts (padding beyond an item's length is input like any other)."""

    samples_per_frame = 320

    def __init__(self, num_classes: int = len(VOCABULARY), sample_rate: int = 16_000, n_mels: int = 64,
                 channels: int = 128, hidden: int = 128, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.features = LogMel(sample_rate, hop=self.samples_per_frame // 2, n_mels=n_mels)
        self.norm = nn.BatchNorm1d(n_mels)
        self.conv = nn.Sequential(
            nn.Conv1d(n_mels, channels, 5, padding=2), nn.BatchNorm1d(channels), nn.GELU(),
            nn.Conv1d(channels, channels, 5, stride=2, padding=2), nn.BatchNorm1d(channels), nn.GELU(),
        )
        self.rnn = nn.LSTM(channels, hidden, num_layers=layers, bidirectional=True, batch_first=True,
                           dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, num_classes)

    def frames(self, samples: Tensor | int) -> Tensor | int:
        """Output frames for inputs of ``samples`` samples: ``ceil((samples // hop + 1) / 2)``."""
        return (samples // (self.samples_per_frame // 2) + 1 + 1) // 2

    def forward(self, waveform: Tensor) -> Tensor:
        # no packed sequences: PyTorch's CPU backward through them is several times slower, and
        # the training batches are windows of similar lengths (little padding)
        x = self.conv(self.norm(self.features(waveform)))  # (B, channels, T)
        x, _ = self.rnn(self.dropout(x.transpose(1, 2)))
        return self.head(self.dropout(x))


def build(**config) -> AcousticCNNLSTM:
    """The model folder's factory: ``build(**config)`` (the keyword arguments of :class:`AcousticCNNLSTM`)."""
    return AcousticCNNLSTM(**config)
