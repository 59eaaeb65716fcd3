"""Datasets, view pipelines and the data module."""

from ssl_lib.data.datasets import (
    DataError,
    IndexedDataset,
    build_base_dataset,
    file_list,
    image_folder,
    subsample,
)
from ssl_lib.data.module import SSLDataModule
from ssl_lib.data.synthetic import SyntheticPatterns
from ssl_lib.data.transforms import VIEWS, MultiView

__all__ = [
    "VIEWS",
    "DataError",
    "IndexedDataset",
    "MultiView",
    "SSLDataModule",
    "SyntheticPatterns",
    "build_base_dataset",
    "file_list",
    "image_folder",
    "subsample",
]
