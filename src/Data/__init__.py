"""Data sets and the seeded batch order; start with ``load_data`` (see ``datasets``)."""

from .batching import BatchStream, LoaderBatchStream, PoolBatchStream, TensorBatchStream, epoch_permutation
from .datasets import DATASETS, DatasetEntry, TaskData, load_data
from .images import DEFAULT_ROOT, IMAGE_DATASETS, generate_imagedata, stratified_subset
from .regression import REGRESSION_DATASETS, LinearRegressionDataset, generate_regressiondata

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "IMAGE_DATASETS",
    "REGRESSION_DATASETS",
    "BatchStream",
    "DatasetEntry",
    "LinearRegressionDataset",
    "LoaderBatchStream",
    "PoolBatchStream",
    "TaskData",
    "TensorBatchStream",
    "epoch_permutation",
    "generate_imagedata",
    "generate_regressiondata",
    "load_data",
    "stratified_subset",
]
