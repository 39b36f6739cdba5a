"""Quality metrics for the embedded tiny digits model: a digits classifier, class-conditional
accuracy of generated images, and a Fréchet distance on the classifier's features."""

from .classifier import CLASSIFIER_FILE, DigitsClassifier, load_classifier
from .data import HELDOUT_FILE, digits_to_images, load_heldout
from .metrics import QualityReport, class_accuracy, frechet_distance, frechet_from_features, score_images

__all__ = [
    "CLASSIFIER_FILE",
    "DigitsClassifier",
    "load_classifier",
    "HELDOUT_FILE",
    "digits_to_images",
    "load_heldout",
    "QualityReport",
    "class_accuracy",
    "frechet_distance",
    "frechet_from_features",
    "score_images",
]
