"""A small CNN: cheap enough to train on one CPU per node, real enough to show DDP at work."""

from torch import nn


class SmallCNN(nn.Module):
    # No BatchNorm: its running statistics are per process, which would make a DDP step differ
    # from a single process on the full batch (the test of DDP correctness relies on equality).
    def __init__(self, num_classes: int = 10, channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
