"""The data of one run: where it is (:class:`DataPaths`), its tables, vocabulary, train/validation split
(:mod:`mlc.data.splits`, or a validation table of one's own) and
caption tokenizer (:func:`prepare_data` -> :class:`RunData`), the check that the image folder holds the listed
images, the budget of unreadable images, and the run's two sources (:func:`open_sources`): read through the
decode-once store (:mod:`mlc.data.store`) when the node has room for it, else streamed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mlc.config import TrainConfig, uses_captions, uses_images
from mlc.data.labels import LabelVocab
from mlc.data.pack import check_side, open_pack, read_frame, read_frames
from mlc.data.pack_source import fill_store, locate_ids
from mlc.data.splits import largest_gap, split_rows
from mlc.data.sources import StoredTable, StreamTable
from mlc.data.store_choice import open_for_run
from mlc.data.table import TableError, captions_of, id_problem, read_table, unlabelled_rows
from mlc.data.tokenizer import Tokenizer, empty_captions
from mlc.data.transforms import eval_transform, train_transform
from mlc.errors import DataError
from mlc.io import storage


@dataclass
class DataPaths:
    """Where a run's tables and images are: a source's files, or a pack (:mod:`mlc.data.pack`; ``pack`` its URL,
    its images named ``<pack>``, and its tables ``<pack>/train`` and ``<pack>/test`` unless tables of one's own are
    given, whose ImageIDs are then looked up in the pack)."""
    train_csv: str
    test_csv: str
    images: str
    pack: str | None = None

    @classmethod
    def resolve(cls, data: str, images=None, train_csv=None, test_csv=None) -> "DataPaths":
        """The COMP5329S1A2Dataset layout under ``data``, or the pack at ``data``; each part of a source can be
        overridden.

        A relative ``images`` is a folder inside ``data`` (``--images images`` for the real set's
        layout); the tables, when given, are paths or URLs as written (relative to the working folder).
        """
        from mlc.data.pack import is_pack
        if is_pack(data):
            if images:
                from mlc.errors import UsageError
                raise UsageError(f"{storage.safe_url(data)} is a pack, which holds its images: drop --images")
            return cls(train_csv or storage.join(data, "train"), test_csv or storage.join(data, "test"), data, pack=data)

        def image_root():
            if images is None:
                return storage.join(data, "data")
            return images if "://" in images or images.startswith("/") else storage.join(data, images)
        return cls(train_csv or storage.join(data, "train.csv"), test_csv or storage.join(data, "test.csv"),
                   image_root())


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
    packed: object = None  # where each labelled row's image is in a pack (mlc.data.pack_source.PackedImages)
    packed_test: object = None  # and each test row's

    @property
    def key(self) -> str:
        """What the training rows are (ImageIDs, labels, the split), hashed: the order of an epoch's rows follows
        from them, so a run resumed inside an epoch must see the same."""
        rows = [(i, list(labs)) for i, labs in zip(self.train_df.ImageID, self.train_df.Labels)]
        text = json.dumps([rows, self.tr.tolist()], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

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
        raise DataError(f"--inputs {inputs}: {table} has no captions (no Caption column, or every caption empty); "
                        "use --inputs image")
    return inputs


def prepare_data(cfg: TrainConfig, log=print) -> RunData:
    paths = DataPaths.resolve(cfg.data, cfg.images, cfg.train_csv, cfg.test_csv)
    pack = open_pack(paths.pack) if paths.pack is not None else None
    if pack is not None:
        read_frames(pack)
    train_df, test_df = read_tables(paths, cfg.require_labels, pack)
    vocab = LabelVocab.from_label_lists(train_df.Labels)
    Y = vocab.encode(train_df.Labels, context=f"{paths.train_csv}: ")
    inputs = resolve_inputs(cfg.inputs, train_df, paths.train_csv)  # from the training table alone
    if cfg.val_table:
        train_df, Y, tr, va = with_val_table(cfg.val_table, train_df, Y, vocab, cfg.require_labels, paths.train_csv)
        how = f"validation table {storage.safe_url(cfg.val_table)}"
    else:
        tr, va = split_rows(cfg.split, train_df.ImageID, Y, cfg.val_fraction, cfg.seed)
        how = f"{cfg.split} split"
    if cfg.refit:  # the final model: every labelled row trains, nothing is validated (mlc.train.refit)
        tr, va = np.arange(len(train_df)), np.arange(0)
        how = f"a refit of {storage.safe_url(cfg.refit)}: every row trains"
    else:
        gap, label = largest_gap(Y, tr, va)
        how += f"; largest label-share gap {gap:.4f}, label {vocab.labels[label]}"
    empty = unlabelled_rows(train_df)
    log(f"data: {len(train_df)} labelled ({len(tr)} train / {len(va)} validation, {how}), {len(test_df)} test, "
        f"{len(vocab)} labels; the network reads {inputs}{' (auto)' if cfg.inputs == 'auto' else ''}")
    if empty:
        log(f"data: {empty} of {len(train_df)} labelled rows have an empty Labels field: images with none of the "
            "labels, trained on as all-negative examples (--require-labels refuses them)")
    urls = image_urls(paths.images, train_df.ImageID)
    packed = packed_test = None
    if uses_images(inputs) and pack is None:
        check_images_found(paths.images, urls, table=paths.train_csv)
    elif uses_images(inputs):
        check_side(pack, cfg.image_size)
        # Both tables located at once: a test ImageID the pack lacks is refused now, not after training.
        both = locate_ids(pack, list(train_df.ImageID) + list(test_df.ImageID), "ImageIDs of the run's two tables",
                          "give the tables the pack was made from (or none: the pack's own), or pack these tables")
        n = len(train_df)
        packed, packed_test = both.take(np.arange(n)), both.take(np.arange(n, len(both.ids)))
    data = RunData(paths, train_df, test_df, vocab, Y, tr, va, urls, inputs, packed=packed, packed_test=packed_test)
    if uses_captions(inputs):
        captions = captions_of(train_df)
        data.use_tokenizer(Tokenizer.fit([captions[i] for i in tr]))
        empty_train, empty_test = empty_captions(captions), empty_captions(captions_of(test_df))
        log(f"captions: {len(data.tokenizer.vocab)} words; rows without a caption: {empty_train} of {len(train_df)} "
            f"labelled, {empty_test} of {len(test_df)} test"
            + (" (predicted from the image alone)" if inputs == "image+caption" and (empty_train or empty_test)
               else " (predicted from the label prior)" if empty_train or empty_test else ""))
    return data


def with_val_table(url: str, train_df: pd.DataFrame, Y: np.ndarray, vocab: LabelVocab, require_labels: bool,
                   train_url: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """``--val-table``: the training table's rows all train, the table's rows validate (appended after them).
    Refused, naming the table and the row: a label the training table does not have (the network has no output
    for it), or an ImageID the training table has too (its score would be a training row's)."""
    from mlc.errors import DataError
    val_df = read_table(url, require=("ImageID", "Labels"), labelled=True, require_labels=require_labels)
    where = storage.safe_url(url)
    for row, (image_id, labs) in enumerate(zip(val_df.ImageID, val_df.Labels), start=1):
        unknown = [lab for lab in labs if lab not in vocab.index]
        if unknown:
            raise DataError(f"--val-table {where}: row {row} ({image_id}) has label {unknown[0]!r}, which no row of "
                            f"{storage.safe_url(train_url)} has (its labels: {' '.join(vocab.labels)}); a network "
                            "trained on that table has no output for it: drop the row or the label")
    shared = sorted(set(val_df.ImageID) & set(train_df.ImageID))
    if shared:
        raise DataError(f"--val-table {where}: {len(shared)} of its ImageIDs are in {storage.safe_url(train_url)} "
                        f"too (e.g. {', '.join(shared[:3])}): validation rows must not train; remove them from one "
                        "of the tables")
    n = len(train_df)
    both = pd.concat([train_df, val_df], ignore_index=True)
    if "Caption" in both.columns:  # a table without the column: rows without a caption, as an empty cell is
        both["Caption"] = both.Caption.where(both.Caption.notna(), "")
    return both, np.concatenate([Y, vocab.encode(val_df.Labels)]), np.arange(n), np.arange(n, len(both))


def test_images(data: RunData):
    """Where the test table's images are: the image folder, or their rows in the run's pack (looked up there)."""
    return data.paths.images if data.packed_test is None else data.packed_test


def open_sources(cfg: TrainConfig, data: RunData, log=print, *, decoders: int = 1):
    """``(train, validation, store)``: the run's two sources, both reading through one store of every labelled
    row when there is one (``store`` None: streaming). The caller closes the store when training ends.
    ``decoders``: the processes that will decode the batches (the loader's workers, or this one)."""
    def tokens(rows):
        return [data.tokens[i] for i in rows] if data.tokens is not None else None

    transforms = (train_transform(cfg.image_size), eval_transform(cfg.image_size))
    reads = uses_images(cfg.inputs)
    store = open_for_run(data.urls, cfg.image_size, cfg.store, cfg.store_budget, log,
                         reason_off=None if reads else "the network reads no images",
                         key=None if data.packed is None else data.packed.pack.manifest["source"]["key"],
                         decoders=decoders)
    if data.packed is not None:
        if store is None:
            raise DataError(f"{storage.safe_url(data.packed.url)} is a pack, which a run reads into the image store "
                            "whole shards at a time, and this run has no store (above: why); raise --store-budget, "
                            "set MLC_STORE_DIR to a larger local disk, or use --store auto")
        fill_store(store, data.packed, log)
    if store is None:
        return tuple(StreamTable([data.urls[i] for i in rows], data.Y[rows], tf, cfg.max_image_pixels,
                                 captions=tokens(rows), read_images=reads)
                     for rows, tf in zip((data.tr, data.va), transforms)) + (None,)
    return tuple(StoredTable([data.urls[i] for i in rows], data.Y[rows], tf, cfg.max_image_pixels, store, rows,
                             captions=tokens(rows))
                 for rows, tf in zip((data.tr, data.va), transforms)) + (store,)


# Enough rows that a folder holding most of the listed images cannot miss them all by chance, few enough to
# check in about one round trip (concurrently) before anything starts.
PREFLIGHT_IMAGES = 32


def check_images_found(images: str, urls: list, *, table: str, first: int = PREFLIGHT_IMAGES) -> None:
    """Fail before any work when the image folder does not exist or holds none of the first ``first``
    images the table lists (a wrong --images or --data); a few missing images are the bad-image budget's
    business, later."""
    from concurrent.futures import ThreadPoolExecutor

    if not urls:
        return
    if not storage.isdir(images):
        raise DataError(f"image folder {storage.safe_url(images)} does not exist; check --data and --images "
                        "(relative --images are inside --data)")
    sample = urls[:first]
    with ThreadPoolExecutor(min(16, len(sample))) as pool:
        found = sum(pool.map(storage.exists, sample))
    if not found:
        raise DataError(f"none of the first {len(sample)} images listed in {storage.safe_url(table)} is in "
                        f"{storage.safe_url(images)} (e.g. {sample[0].rsplit('/', 1)[-1]}); check --data and --images")


def read_tables(paths: DataPaths, require_labels: bool = False, pack=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and test tables: files, or a pack's own (held to the rules a file meets when read)."""
    frames = []
    for which, url in (("train", paths.train_csv), ("test", paths.test_csv)):
        if pack is not None and url == storage.join(pack.url, which):
            frames.append(read_frame(pack, which))
            if which == "train":
                check_training_rows(frames[-1], url, require_labels)
        elif which == "train":
            frames.append(read_table(url, require=("ImageID", "Labels"), trains=True, require_labels=require_labels))
        else:
            frames.append(read_table(url))
    return frames[0], frames[1]


def check_training_rows(df: pd.DataFrame, url: str, require_labels: bool) -> None:
    """What :func:`mlc.data.table.read_table` checks of a training table, for one read from a pack."""
    empty = [i for i, labs in zip(df.ImageID, df.Labels) if not labs]
    if len(empty) == len(df):
        raise TableError(url, None, f"every one of its {len(df)} rows has an empty Labels field: there is nothing to "
                         "learn; label at least some images (an empty field is an image with none of the labels)")
    if require_labels and empty:
        raise TableError(url, None, f"ImageID {empty[0][:80]!r} has an empty Labels field (--require-labels); label "
                         "it or drop --require-labels")


class TooManyBadImages(RuntimeError):
    pass


class BadImageBudget:
    """Counts unreadable images; stops the run once more than ``max_fraction`` of ``total`` are bad.

    Each bad image is warned about once, by name, and counted once however many epochs meet it.
    """

    def __init__(self, total: int, max_fraction: float, log=print):
        self.total, self.max_fraction, self.log = total, max_fraction, log
        self.bad: dict[str, str] = {}

    def add(self, skipped: list) -> None:
        for s in skipped:
            if s.name not in self.bad:
                self.bad[s.name] = s.reason
                self.log(f"warning: skipping unreadable image {s.name}: {s.reason}")
        if len(self.bad) > self.max_fraction * self.total:
            names = ", ".join(list(self.bad)[:10])
            raise TooManyBadImages(
                f"{len(self.bad)} of {self.total} images are unreadable (more than --max-bad-fraction "
                f"{self.max_fraction:g}); first: {names}. Fix or remove them, or raise --max-bad-fraction.")


def image_urls(images_root: str, ids) -> list[str]:
    """Each ImageID joined onto the image folder. The tables refuse ids that would leave it (absolute, URL,
    ``..``: :func:`mlc.data.table.id_problem`); ids given here some other way (the API) meet the same rule."""
    urls = []
    for i in ids:
        if (problem := id_problem(i)) is not None:
            raise DataError(f"ImageID {i[:80]!r} cannot name an image in {storage.safe_url(images_root)}: {problem}; "
                            "ImageIDs are file names inside the image folder")
        urls.append(storage.join(images_root, i))
    return urls
