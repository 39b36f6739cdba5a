"""Scores of generated images under the digits classifier.

- `class_accuracy`: the share of images the classifier assigns to the label they were generated for.
- `frechet_distance`: an FID-style distance between Gaussian fits of the classifier's penultimate
  features of two image sets (generated vs real held-out). It depends on the sample counts, so
  compare values at equal counts only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .classifier import DigitsClassifier, load_classifier
from .data import digits_to_images, load_heldout


@torch.inference_mode()
def predict(classifier: DigitsClassifier, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([classifier(images[i : i + batch]).argmax(-1) for i in range(0, len(images), batch)])


@torch.inference_mode()
def features(classifier: DigitsClassifier, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([classifier.features(images[i : i + batch]) for i in range(0, len(images), batch)])


def class_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels) -> float:
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return (predict(classifier, images) == labels).float().mean().item()


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross))


def frechet_distance(classifier: DigitsClassifier, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    return frechet_from_features(features(classifier, images_a), features(classifier, images_b))


@dataclass
class QualityReport:
    accuracy: float  # classifier accuracy of generated images w.r.t. their labels
    frechet: float  # Fréchet distance to the real held-out images (classifier features)
    num_generated: int
    num_real: int

    def __str__(self) -> str:
        return (
            f"class accuracy {100 * self.accuracy:.1f}% on {self.num_generated} samples, "
            f"Fréchet distance {self.frechet:.2f} (vs {self.num_real} real held-out images)"
        )


def score_images(images: torch.Tensor, labels, classifier: DigitsClassifier | None = None) -> QualityReport:
    """Accuracy of `images` [B, 3, H, W] in [-1, 1] generated for `labels`, and their Fréchet
    distance to the real held-out digits (rendered at the same resolution)."""
    classifier = classifier or load_classifier()
    digits, _ = load_heldout()
    real = digits_to_images(digits, images.shape[-1])
    return QualityReport(
        class_accuracy(classifier, images, labels),
        frechet_distance(classifier, images.float().clamp(-1, 1), real),
        len(images),
        len(real),
    )
