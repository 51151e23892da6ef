"""One batch of rows, the only shape rows travel in from a table to the network (:class:`Batch`), what a table's
rows carry (:class:`Reads`) and an unreadable row (:class:`Skipped`).

Every source (:mod:`mlc.data.sources`) makes whole batches and every loader (:mod:`mlc.data.loader`) yields
them, so the training step and scoring read named fields and never ask what kind of loader or table they were
given: the row count of the step over all ranks (the loss divides by it) and the blank inputs of an empty
share come with the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mlc.data.transforms import crop_batch, to_model_input, tokens_to_tensors


@dataclass(frozen=True)
class Skipped:
    """A row whose image could not be used: its table row, its file name and why."""
    index: int
    name: str
    reason: str


@dataclass(frozen=True)
class Reads:
    """What a table's rows give the network: images at ``side`` px, caption token ids, or both."""
    images: bool
    captions: bool
    side: int

    def blank(self, device: torch.device) -> tuple:
        """The inputs of one blank row: a zero image and an empty caption (an empty bag), as read. A rank whose
        share of a step is empty runs these through the network, so that its gradient all-reduce pairs with
        the other ranks' (:func:`mlc.train.engine.train_step`)."""
        out = ()
        if self.images:
            out = (torch.zeros(1, 3, self.side, self.side, device=device).contiguous(memory_format=torch.channels_last),)
        if self.captions:
            out += (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
        return out


@dataclass
class Batch:
    """This rank's usable rows of one step or scoring pass.

    ``index`` holds their table rows, in the order of every other field. ``images`` is uint8: decoded crops
    (n, 3, size, size), or whole slots of the decode-once store (n, side, side, 3) with each row's crop box,
    flip and output size in ``boxes`` (:func:`mlc.data.augment.geometry`), cut on the device; None when the
    network reads no image. ``targets`` is (n, C), (n, 0) for a table without labels. ``tokens`` holds one
    caption id list per row when captions are read. ``names`` are the rows' file names (to name a batch that
    made the loss non-finite). ``skipped`` are the rows of this step that could not be read.
    ``global_rows`` is the step's row count over all ranks, skipped rows included (set by the loader).
    """
    index: torch.Tensor
    targets: torch.Tensor
    reads: Reads
    images: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    tokens: list | None = None
    names: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    global_rows: int = 0

    def __len__(self) -> int:
        return len(self.index)

    def split(self, rows: int | None) -> list["Batch"]:
        """This batch in parts of at most ``rows`` rows (itself when it fits, or ``rows`` is None); each part keeps
        the step's ``global_rows``, which the loss divides by, so the parts' gradients add up to the whole's."""
        if rows is None or len(self) <= rows:
            return [self]
        out = []
        for a in range(0, len(self), rows):
            part = slice(a, a + rows)
            out.append(Batch(self.index[part], self.targets[part], self.reads,
                             images=self.images[part] if self.images is not None else None,
                             boxes=self.boxes[part] if self.boxes is not None else None,
                             tokens=self.tokens[part] if self.tokens is not None else None,
                             names=self.names[part], global_rows=self.global_rows))
        return out

    def pin_memory(self) -> "Batch":
        for name in ("images", "boxes", "targets"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.pin_memory())
        return self

    def inputs(self, device: torch.device) -> tuple:
        """The network's inputs on ``device``: ``(x,)`` normalised float images, ``(ids, offsets)`` caption tokens,
        or ``(x, ids, offsets)``; one blank row (:meth:`Reads.blank`) when the batch has no usable row."""
        if not len(self):
            return self.reads.blank(device)
        out = ()
        if self.images is not None:
            out = (crop_batch(self.images, self.boxes, device) if self.boxes is not None
                   else to_model_input(self.images, device),)
        if self.tokens is not None:
            out += tokens_to_tensors(self.tokens, device)
        return out

    def targets_on(self, device: torch.device) -> torch.Tensor:
        return self.targets.to(device, non_blocking=device.type == "cuda")


def empty_batch(reads: Reads, num_targets: int, skipped: list) -> Batch:
    """A batch none of whose rows could be read."""
    return Batch(torch.zeros(0, dtype=torch.long), torch.zeros(0, num_targets), reads, skipped=list(skipped))
