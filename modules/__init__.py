"""Ready LightningModules and DataModules (installed as ``lightning_plugins.modules``).

Planned (later issues): ``FaceRecognizer``, ``ObjectDetector``, ``SFTModule``, ``RewardModel``, ``DPOModule``.
"""

from lightning_plugins.modules.data import (
    DigitsDataModule,
    ImageClassificationDataModule,
    ImageFolderDataModule,
    LabelledImageDataset,
    MNIST5kDataModule,
    TensorDataModule,
)
from lightning_plugins.modules.image_classifier import ImageClassifier

__all__ = [
    "DigitsDataModule",
    "ImageClassificationDataModule",
    "ImageClassifier",
    "ImageFolderDataModule",
    "LabelledImageDataset",
    "MNIST5kDataModule",
    "TensorDataModule",
]
