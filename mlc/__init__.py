"""mlc: multi-label image classification (ResNet50 transfer learning) from captioned image tables.

The public entry points most users need; every module can also be imported on its own.
"""

from .labels import LabelVocab
from .table import TableError, read_ids, read_table

__all__ = ["read_table", "read_ids", "TableError", "LabelVocab"]
__version__ = "0.1.0"
