"""Datasets and loaders: files on disk -> ``Splits`` -> normalized batches on the device.

Importing this package registers every dataset in ``DATASETS`` (one module per dataset).
"""
from ptd.data.base import (
    DATASETS,
    DataError,
    FolderSplit,
    RawDataset,
    Split,
    Splits,
    channel_stats,
    frame_size,
    load_configured,
    load_dataset,
    verify_images,
)
from ptd.data.loader import FolderLoader, TensorLoader, crop_batch, flip_batch, make_loader, random_crop_flip

# Imported for their registration side effect.
from ptd.data import cifar, fashion_mnist, imagefolder, tiny_imagenet  # noqa: E402,F401

__all__ = [
    "DATASETS",
    "DataError",
    "FolderLoader",
    "FolderSplit",
    "RawDataset",
    "Split",
    "Splits",
    "TensorLoader",
    "channel_stats",
    "crop_batch",
    "flip_batch",
    "frame_size",
    "load_configured",
    "load_dataset",
    "make_loader",
    "random_crop_flip",
    "verify_images",
]
