"""Datasets and DataModules."""

from lightning_plugins.modules.data.classification import (
    DigitsDataModule,
    ImageClassificationDataModule,
    ImageFolderDataModule,
    MNIST5kDataModule,
    TensorDataModule,
)
from lightning_plugins.modules.data.datasets import LabelledImageDataset, stratified_split

__all__ = [
    "DigitsDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "LabelledImageDataset",
    "MNIST5kDataModule",
    "TensorDataModule",
    "stratified_split",
]
