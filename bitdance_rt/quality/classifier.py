"""A small CNN digit classifier: the judge of generated images (accuracy and Fréchet features)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ASSETS

CLASSIFIER_FILE = ASSETS / "digits_classifier.safetensors"
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """RGB [B, 3, H, W] in [-1, 1] (any H = W >= 16; resized to 32) -> logits [B, 10].

    `features` gives the penultimate activations [B, FEATURE_DIM] used by the Fréchet distance.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def load_classifier(path: str | Path = CLASSIFIER_FILE) -> DigitsClassifier:
    from safetensors.torch import load_file

    net = DigitsClassifier()
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval()
