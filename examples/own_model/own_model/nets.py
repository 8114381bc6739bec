"""The project's network: a small conv net whose width and dropout the study searches."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU stages, global pooling and a linear classifier (the head)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16,
                 dropout: float = 0.0) -> None:
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.dropout(self.features(x)))
