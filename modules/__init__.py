"""Ready LightningModules and DataModules (installed as ``lightning_plugins.modules``).

Image classification (:class:`ImageClassifier` and its DataModules) and the Xwin-LM alignment stages
(:class:`SFTModule`, :class:`RewardModel`, :class:`DPOModule`, their DataModules, rejection sampling: see
:mod:`lightning_plugins.modules.align`). Planned (later issues): ``FaceRecognizer``, ``ObjectDetector``.
"""

from lightning_plugins.modules.align import (
    DPOModule,
    PreferenceDataModule,
    RewardModel,
    SFTDataModule,
    SFTModule,
)
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
    "DPOModule",
    "DigitsDataModule",
    "ImageClassificationDataModule",
    "ImageClassifier",
    "ImageFolderDataModule",
    "LabelledImageDataset",
    "MNIST5kDataModule",
    "PreferenceDataModule",
    "RewardModel",
    "SFTDataModule",
    "SFTModule",
    "TensorDataModule",
]
