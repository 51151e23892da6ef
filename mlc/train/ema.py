"""An exponential moving average of a model's weights (``--ema DECAY``), as timm's ``ModelEmaV3`` and
torchvision's ``--model-ema`` keep one: updated after every optimizer step, used for validation, ``best/`` and
the predictions, saved in the checkpoint and resumed with it.

What is averaged: the trainable parameters and the floating-point buffers (BatchNorm's running statistics);
frozen parameters never change, so the averaged model takes them from the model itself. The decay warms up
as timm's does, ``min(DECAY, (1 + t) / (10 + t))`` at update ``t``: without it a short run's average would still
be mostly its random start (at 0.999, 37% of the weight after 1,000 steps).

On Ray Train every rank keeps one, from identical weights: DDP gives every rank the same parameters after
every step, so their averages are the same bits. BatchNorm's running statistics are each rank's own between
DDP's broadcasts, so before the average is used (:meth:`Ema.agree`) every rank takes rank 0's buffers, and the
ranks check that their averages are identical.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from mlc.model.resnet import bare_module, strip_prefixes


class Ema:
    def __init__(self, model: torch.nn.Module, decay: float):
        model = bare_module(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        buffers = {n for n, b in model.named_buffers() if b.is_floating_point()}
        live = model.state_dict(keep_vars=True)
        self.names = [n for n in live if n in trainable or n in buffers]
        self.buffer_names = [n for n in self.names if n in buffers]
        self.live = [live[n] for n in self.names]  # the model's own tensors, updated in place by every step
        self.shadow = [t.detach().clone() for t in self.live]
        self.decay, self.updates = decay, 0

    def decay_now(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | None = None) -> None:
        """Average in the model's weights after a step; ``skipped`` (a device flag: the step's update was skipped)
        leaves the average as it was without a wait for the device."""
        d = torch.tensor(self.decay_now(), device=self.shadow[0].device)
        if skipped is not None:
            d = torch.where(skipped, torch.ones_like(d), d)
        live = [t.detach() for t in self.live]
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, torch._foreach_mul(live, 1 - d))
        self.updates += 1

    def weights(self) -> dict:
        """The averaged tensors by state-dict name, on the CPU (what a checkpoint keeps)."""
        return {n: t.detach().to("cpu").clone() for n, t in zip(self.names, self.shadow)}

    def to_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "weights": self.weights()}

    def load(self, saved: dict) -> None:
        """Continue from a checkpoint's average (:meth:`to_dict`)."""
        weights = strip_prefixes(saved["weights"])
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise KeyError(f"the saved weight average lacks {missing[:3]}")
        with torch.no_grad():
            for n, t in zip(self.names, self.shadow):
                t.copy_(weights[n])
        self.updates = int(saved["updates"])

    def averaged_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of the bare ``model`` holding the averaged weights (to score or save)."""
        model = bare_module(model)
        out = copy.deepcopy(model)
        state = dict(out.state_dict())
        state.update(zip(self.names, self.shadow))
        out.load_state_dict(state)
        return out

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in self.shadow:
            h.update(t.detach().to("cpu").contiguous().flatten().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def agree(self, all_gather) -> None:
        """Make every rank's average rank 0's (BatchNorm's statistics) and check that it is (``all_gather``: the
        group's). A difference left is a bug: the ranks would validate and save different models."""
        if self.buffer_names:
            mine = {n: t.detach().to("cpu") for n, t in zip(self.names, self.shadow) if n in self.buffer_names}
            first = all_gather(mine)[0]
            with torch.no_grad():
                for n, t in zip(self.names, self.shadow):
                    if n in first:
                        t.copy_(first[n])
        digests = all_gather(self.digest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"the ranks' weight averages differ ({len(set(digests))} distinct); this is a bug")
