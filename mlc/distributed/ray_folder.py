"""What Ray Train kept in a run folder (its own checkpoint snapshot), and the storage Ray writes it through.

The folder's layout and best/ are in :mod:`mlc.train.run_folder`; this module reads Ray's side of it.
"""

from __future__ import annotations

import os

from mlc.io import storage
from mlc.train.run_folder import epoch_of


def ray_storage(url: str):
    """``(storage_path, storage_filesystem)`` for Ray's RunConfig: the filesystem mlc uses, for gs:// too."""
    if storage.is_local(url):
        return os.path.abspath(url), None
    fs, path = pyarrow_filesystem(url)
    return path, fs


def pyarrow_filesystem(url: str):
    """``(pyarrow.fs.FileSystem, path)`` for a URL, e.g. for Ray's ``RunConfig(storage_filesystem=...,
    storage_path=path)``: pyarrow's LocalFileSystem for local paths, otherwise the same fsspec filesystem
    :mod:`mlc.io.storage` uses (gcsfs for gs://, with its credential chain) wrapped by ``pyarrow.fs.FSSpecHandler``.
    """
    import pyarrow.fs as pafs
    fs, path = storage.filesystem(url)
    if storage.is_local(url):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")


def kept_checkpoints(run_url: str) -> list:
    """``(epoch, metrics)`` for every checkpoint Ray Train kept in the run folder, from its own snapshot
    (``ray.train.Result.from_path``): never a checkpoint it has deleted."""
    from ray.train import Result
    path, fs = ray_storage(run_url)
    result = Result.from_path(path, storage_filesystem=fs)
    out = []
    for ckpt, metrics in result.best_checkpoints or []:
        out.append((epoch_of(ckpt.path), dict(metrics)))
    return sorted(out, key=lambda t: t[0])
