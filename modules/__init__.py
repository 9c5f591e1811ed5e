"""Ready LightningModules and DataModules (installed as ``lightning_plugins.modules``).

Image classification (:class:`ImageClassifier` and its DataModules), face recognition (:class:`FaceRecognizer`,
:class:`FaceDataModule`: see :mod:`lightning_plugins.modules.face`) and the Xwin-LM alignment stages
(:class:`SFTModule`, :class:`RewardModel`, :class:`DPOModule`, their DataModules, rejection sampling: see
:mod:`lightning_plugins.modules.align`). Backbones are built by name in one registry
(:func:`lightning_plugins.modules.backbones.build_backbone`). Object detection: :class:`ObjectDetector`,
:class:`COCODetectionDataModule` (see :mod:`lightning_plugins.modules.detection`).
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
from lightning_plugins.modules.detection import COCODetectionDataModule, ObjectDetector
from lightning_plugins.modules.face import FaceDataModule, FaceRecognizer
from lightning_plugins.modules.image_classifier import ImageClassifier

__all__ = [
    "COCODetectionDataModule",
    "DPOModule",
    "DigitsDataModule",
    "FaceDataModule",
    "FaceRecognizer",
    "ImageClassificationDataModule",
    "ImageClassifier",
    "ImageFolderDataModule",
    "LabelledImageDataset",
    "MNIST5kDataModule",
    "ObjectDetector",
    "PreferenceDataModule",
    "RewardModel",
    "SFTDataModule",
    "SFTModule",
    "TensorDataModule",
]
