"""Object detection: :class:`ObjectDetector` over torchvision, transformers and mmdet detectors (one batch contract,
see :mod:`.backends.base`), :class:`COCODetectionDataModule` (COCO json + images; the embedded default is the
MNIST scenes: real digits, synthetic layout) and COCO mAP."""

from lightning_plugins.modules.detection.data import COCODetectionDataModule, detection_collate
from lightning_plugins.modules.detection.detector import ObjectDetector

__all__ = ["COCODetectionDataModule", "ObjectDetector", "detection_collate"]
