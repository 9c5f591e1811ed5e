"""Face recognition: :class:`FaceRecognizer` (backbone + embedding + margin head), :class:`FaceDataModule`
(embedded instance identities, identity folders with optional MTCNN alignment, InsightFace RecordIO and ``.bin``
pair sets), verification metrics and margin heads."""

from lightning_plugins.modules.face.data import FaceDataModule, VerificationPairs
from lightning_plugins.modules.face.heads import MarginHead
from lightning_plugins.modules.face.metrics import VerificationMetrics
from lightning_plugins.modules.face.recognizer import FaceRecognizer

__all__ = ["FaceDataModule", "FaceRecognizer", "MarginHead", "VerificationMetrics", "VerificationPairs"]
