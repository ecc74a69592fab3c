"""LeNet as in the MNIST transfer example: 10 layers, the first 7 give an 800-d feature."""
from __future__ import annotations

from torch import nn

# Grayscale 28x28 digits scaled to [0, 1], no normalisation (as the original NetEncoder).
LENET_DATA_CONFIG = {"input_size": (1, 28, 28), "interpolation": "bilinear",
                     "mean": (0.0,), "std": (1.0,), "crop_pct": 1.0, "crop_mode": "squash"}


def lenet(num_classes: int = 10, in_chans: int = 1) -> nn.Sequential:
    """conv 20@5x5, ReLU, maxpool 2, conv 50@5x5, ReLU, maxpool 2, flatten (800),
    linear 500, ReLU, linear ``num_classes``. Index 7 onwards is the classifier head."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 20, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
