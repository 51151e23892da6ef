"""mlc: multi-label image classification (ResNet50 transfer learning) from captioned image tables.

The Python API; ``jobs/train.py --local`` and ``jobs/predict.py`` call the same functions::

    import mlc
    summary = mlc.fit(mlc.TrainConfig(data="gs://bucket/comp5329", images="images", output="runs/r1"))
    mlc.predict("runs/r1", output="runs/r1/again")      # predictions.csv, probabilities.csv
    model, vocab = mlc.load_model("runs/r1")             # torch module in eval mode, its labels
    table = mlc.read_table("runs/r1/again/predictions.csv")

``import mlc`` stays light (no torch, no Ray): ``fit``, ``predict`` and ``load_model`` import their modules
when first used. Every module can also be imported on its own.
"""

from mlc.config import TrainConfig
from mlc.data.labels import LabelVocab
from mlc.data.table import TableError, read_ids, read_table

# name -> (module, attribute): resolved on first use by __getattr__ below.
_LAZY = {
    "fit": ("mlc.train.driver", "fit"),
    "predict": ("mlc.distributed.predict", "predict"),  # in this process, or on Ray Data with num_workers >= 1
    "load_model": ("mlc.prediction.checkpoints", "load_model"),
}

__all__ = ["fit", "predict", "load_model", "read_table", "read_ids", "TrainConfig", "TableError", "LabelVocab"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mlc' has no attribute {name!r}")
    import importlib
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # once resolved, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
