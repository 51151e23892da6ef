"""The data of one training run: tables, vocabulary, split and tokenizer (:func:`prepare_data`), and its training
and validation tables, read through the decode-once store (:mod:`mlc.data.store`) when the node has room for
it, else streamed (read and decoded every epoch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlc.data.datasets import DataPaths, ImageTable, check_images_found, image_urls, read_tables, split_train_val
from mlc.data.labels import LabelVocab
from mlc.data.placement import open_for_run
from mlc.data.table import captions_of, unlabelled_rows
from mlc.data.tokenizer import Tokenizer, empty_captions
from mlc.config import TrainConfig
from mlc.data.transforms import eval_transform, train_transform
from mlc.model.fusion import uses_captions, uses_images


@dataclass
class RunData:
    """What every process derives from the config, identically: tables, vocabulary, split, image URLs, what the
    network reads (``inputs``, resolved from auto) and, when it reads captions, the tokenizer (fitted on the
    training split's captions) and every labelled row's token ids."""
    paths: DataPaths
    train_df: object
    test_df: object
    vocab: LabelVocab
    Y: np.ndarray
    tr: np.ndarray
    va: np.ndarray
    urls: list
    inputs: str = "image"
    tokenizer: Tokenizer | None = None
    tokens: list | None = None

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Encode with ``tokenizer`` (a resumed run's saved one, whose ids its embedding was trained on)."""
        if tokenizer != self.tokenizer:
            self.tokenizer, self.tokens = tokenizer, tokenizer.encode_many(self.train_df.Caption)


def resolve_inputs(inputs: str, train_df, table: str) -> str:
    """``auto`` -> image+caption when the training table has a non-empty caption, else image; a caption network
    on a table without captions is refused."""
    has = "Caption" in train_df.columns and empty_captions(train_df.Caption) < len(train_df)
    if inputs == "auto":
        return "image+caption" if has else "image"
    if uses_captions(inputs) and not has:
        from mlc.errors import DataError
        raise DataError(f"--inputs {inputs}: {table} has no captions (no Caption column, or every caption empty); "
                        "use --inputs image")
    return inputs


def prepare_data(cfg: TrainConfig, log=print) -> RunData:
    paths = DataPaths.resolve(cfg.data, cfg.images, cfg.train_csv, cfg.test_csv)
    train_df, test_df = read_tables(paths, cfg.require_labels)
    vocab = LabelVocab.from_label_lists(train_df.Labels)
    Y = vocab.encode(train_df.Labels, context=f"{paths.train_csv}: ")
    tr, va = split_train_val(train_df.ImageID, cfg.val_fraction, cfg.seed)
    inputs = resolve_inputs(cfg.inputs, train_df, paths.train_csv)
    empty = unlabelled_rows(train_df)
    log(f"data: {len(train_df)} labelled ({len(tr)} train / {len(va)} validation), {len(test_df)} test, "
        f"{len(vocab)} labels; the network reads {inputs}{' (auto)' if cfg.inputs == 'auto' else ''}")
    if empty:
        log(f"data: {empty} of {len(train_df)} labelled rows have an empty Labels field: images with none of the "
            "labels, trained on as all-negative examples (--require-labels refuses them)")
    urls = image_urls(paths.images, train_df.ImageID)
    if uses_images(inputs):
        check_images_found(paths.images, urls, table=paths.train_csv)
    data = RunData(paths, train_df, test_df, vocab, Y, tr, va, urls, inputs)
    if uses_captions(inputs):
        captions = captions_of(train_df)
        data.use_tokenizer(Tokenizer.fit([captions[i] for i in tr]))
        empty_train, empty_test = empty_captions(captions), empty_captions(captions_of(test_df))
        log(f"captions: {len(data.tokenizer.vocab)} words; rows without a caption: {empty_train} of {len(train_df)} "
            f"labelled, {empty_test} of {len(test_df)} test"
            + (" (predicted from the image alone)" if inputs == "image+caption" and (empty_train or empty_test)
               else " (predicted from the label prior)" if empty_train or empty_test else ""))
    return data


def store_off_reason(cfg, reads_images: bool) -> str | None:
    """Why this run cannot use the store, or None."""
    if not reads_images:
        return "the network reads no images"
    if cfg.gpu_decode:
        return "--gpu-decode ships compressed JPEGs to the device every epoch"
    return None


def run_tables(cfg, data, reads_images: bool, log=print):
    """``(train, validation, store)``: the run's two tables, both reading through one store of every labelled
    row when there is one (``store`` None: streaming). The caller closes the store when training ends."""
    Y = data.Y

    def table(rows, transform):
        return ImageTable([data.urls[i] for i in rows], Y[rows], transform, cfg.max_image_pixels,
                          gpu_decode=cfg.gpu_decode, read_images=reads_images,
                          captions=[data.tokens[i] for i in rows] if data.tokens is not None else None)

    if cfg.gpu_decode:
        log("warning: --gpu-decode decodes every image again every epoch (no decode-once store) and was measured "
            "slower than decoding on the CPUs on an H200 (2,996 against 5,500 img/s at depth 1, docs/measurements.md); "
            "it stays for jobs/bench.py --gpu to measure again and goes if that confirms it")
    train_ds, val_ds = table(data.tr, train_transform(cfg.image_size)), table(data.va, eval_transform(cfg.image_size))
    store = open_for_run(data.urls, cfg.image_size, cfg.store, cfg.store_budget, log,
                         reason_off=store_off_reason(cfg, reads_images))
    if store is not None:
        train_ds.use_store(store, data.tr)
        val_ds.use_store(store, data.va)
    return train_ds, val_ds, store
