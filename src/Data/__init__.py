"""Data sets and the seeded batch order; start with ``load_data`` (see ``datasets``). The torchvision sets
(``decoded``) and the regression sets (``regression``) are imported when first used."""
import importlib
from typing import Any

from .batching import BatchStream, PoolBatchStream, TensorBatchStream, epoch_permutation
from .datasets import DATASETS, DatasetEntry, TaskData, load_data
from .images import DEFAULT_ROOT, IMAGE_DATASETS, generate_imagedata, stratified_subset

_LAZY = {"LoaderBatchStream": ".decoded", "REGRESSION_DATASETS": ".regression", "LinearRegressionDataset": ".regression",
         "generate_regressiondata": ".regression"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DATASETS", "DEFAULT_ROOT", "IMAGE_DATASETS", "BatchStream", "DatasetEntry", "PoolBatchStream",
           "TaskData", "TensorBatchStream", "epoch_permutation", "generate_imagedata", "load_data", "stratified_subset",
           *_LAZY]
