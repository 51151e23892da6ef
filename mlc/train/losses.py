"""The training loss, one per run (:func:`make_loss`): binary cross-entropy, the asymmetric loss of Ridnik et al.
(ICCV 2021) or the focal loss of Lin et al. (2017), each optionally with a weight on every label's positives
(``--pos-weight auto``: its negatives over its positives in the training split, capped).

Every loss is summed over a batch's rows and averaged over its labels, as the training step normalises it
(:func:`mlc.train.engine.train_step`). Validation's loss stays plain BCE whatever trains, so that runs with
different losses report comparable validation losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("bce", "asl", "focal")
# The cap on --pos-weight auto. In the real train.csv label 14 is on 0.84% of the rows: its uncapped weight
# would be ~118, so one of its rows in a batch of 32 would pull its logit as hard as ~3.7 batches' worth of
# negatives, and a label with a single training positive would get a weight of the table's size. Other caps are
# not measured; at this one, auto costs the captions 0.015 samples F1 for +0.003 macro F1
# (docs/measurements-recipe.md), which is why it is not the default.
POS_WEIGHT_CAP = 10.0


def auto_pos_weight(y_train: np.ndarray, cap: float = POS_WEIGHT_CAP) -> np.ndarray:
    """Each label's negatives over its positives among the training rows ``y_train`` (0/1, rows x labels), at most
    ``cap``; a label with no training positive gets the cap (it has no positive term to weigh)."""
    pos = y_train.sum(axis=0).astype(np.float64)
    neg = len(y_train) - pos
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1.0), cap)
    return np.minimum(cap, ratio).astype(np.float32)


@dataclass(frozen=True)
class LabelLoss:
    """``loss(logits, targets)``: the rows' summed loss, each row's the mean over its labels.

    ``asl``: a positive label costs ``-(1 - p)^gamma_pos log p``; a negative ``-p_m^gamma_neg log(1 - p_m)`` with
    ``p_m = max(p - clip, 0)``: easy negatives (most of a long-tailed label set's entries) are down-weighted and
    the very easy ones (``p < clip``) cost nothing. ``focal``: the same with ``gamma_pos = gamma_neg`` and no
    clip. ``bce``: both gammas 0, no clip. ``pos_weight`` (per label) multiplies the positive term."""
    name: str = "bce"
    gamma_neg: float = 0.0
    gamma_pos: float = 0.0
    clip: float = 0.0
    pos_weight: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        pos_weight = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        if self.name == "bce":
            return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="sum") / y.shape[1]
        p = torch.sigmoid(logits)
        log_p = F.logsigmoid(logits)
        if self.clip > 0:
            p_neg = (p - self.clip).clamp(min=0)  # the shifted probability of a negative
            log_not = torch.log1p(-p_neg.clamp(max=1 - 1e-7))
        else:
            p_neg, log_not = p, F.logsigmoid(-logits)  # log(1 - p), stable for large logits
        pos = -log_p * (1 - p).pow(self.gamma_pos) if self.gamma_pos else -log_p
        neg = -log_not * p_neg.pow(self.gamma_neg) if self.gamma_neg else -log_not
        if pos_weight is not None:
            pos = pos * pos_weight
        return (y * pos + (1 - y) * neg).sum() / y.shape[1]


def make_loss(cfg, y_train: np.ndarray) -> LabelLoss:
    """The loss ``cfg`` (a TrainConfig) asks for, its positive weights from the training rows ``y_train``."""
    weight = torch.from_numpy(auto_pos_weight(y_train)) if cfg.pos_weight == "auto" else None
    if cfg.loss == "asl":
        return LabelLoss("asl", cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip, weight)
    if cfg.loss == "focal":
        return LabelLoss("focal", cfg.focal_gamma, cfg.focal_gamma, 0.0, weight)
    return LabelLoss("bce", pos_weight=weight)


def describe(loss: LabelLoss) -> str:
    """The loss as the run log says it."""
    what = {"bce": "BCE", "asl": f"asymmetric (gamma- {loss.gamma_neg:g}, gamma+ {loss.gamma_pos:g}, clip "
                                  f"{loss.clip:g})", "focal": f"focal (gamma {loss.gamma_pos:g})"}[loss.name]
    if loss.pos_weight is not None:
        w = loss.pos_weight
        what += f", positives weighted {float(w.min()):.2g}..{float(w.max()):.3g} (auto, capped at {POS_WEIGHT_CAP:g})"
    return f"loss: {what}"
