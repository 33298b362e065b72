"""A small CRNN: convolutions that downsample the width by 4, a BiLSTM, a linear layer to the
classes plus blank. Output time-major ``(T, B, C)`` log-probs, ``T = W / 4``."""
from __future__ import annotations

import torch
from torch import nn


class CRNN(nn.Module):
    def __init__(self, num_classes: int, hidden: int = 96):
        super().__init__()

        def block(cin, cout, pool):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(pool))

        self.features = nn.Sequential(
            block(1, 16, (2, 2)),  # 16 x W/2
            block(16, 32, (2, 2)),  # 8 x W/4
            block(32, 64, (2, 1)),  # 4 x W/4
            block(64, 96, (4, 1)),  # 1 x W/4
        )
        self.rnn = nn.LSTM(96, hidden, bidirectional=True, batch_first=False)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images).squeeze(2)  # (B, 96, T)
        x, _ = self.rnn(x.permute(2, 0, 1))  # (T, B, 2H)
        return self.head(x).log_softmax(-1)
