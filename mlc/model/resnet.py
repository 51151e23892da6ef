"""ResNet50 with a head sized to the label vocabulary, and partial freezing.

The module is a torchvision ``ResNet`` subclass that adds no parameters, so its
state_dict has plain torchvision key names and loads into
``torchvision.models.resnet50(num_classes=N)`` unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet50_Weights  # noqa: F401 - the weights tests patch through this module
from torchvision.models.resnet import Bottleneck, ResNet

from mlc.model.weights import WeightsError, check_weights_found, load_weights, strip_prefixes  # noqa: F401

# Stages in forward order. unfrozen_depth D trains the last D residual stages and the head;
# D=4 trains every stage and the stem too (a full fine-tune, or training from scratch).
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")
FIRST_TRAINABLE = {0: 5, 1: 4, 2: 3, 3: 2, 4: 0}  # a depth above 4 is 4: every stage, stem included


class MultiLabelResNet(ResNet):
    def __init__(self, num_classes: int, unfrozen_depth: int = 1, dropout: float = 0.0, freeze_bn: bool = False):
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
        self.unfrozen_depth = unfrozen_depth
        self.dropout = dropout
        self.freeze_bn = freeze_bn
        self.first_trainable = FIRST_TRAINABLE[min(unfrozen_depth, 4)]
        for i, name in enumerate(STAGES):
            for p in self._stage_params(name):
                p.requires_grad_(i >= self.first_trainable)

    def _stage_modules(self, name: str) -> list[nn.Module]:
        if name == "stem":
            return [self.conv1, self.bn1]
        if name == "head":
            return [self.fc]
        return [getattr(self, name)]

    def _stage_params(self, name: str):
        for m in self._stage_modules(name):
            yield from m.parameters()

    def frozen_modules(self) -> list[nn.Module]:
        return [m for name in STAGES[: self.first_trainable] for m in self._stage_modules(name)]

    def train(self, mode: bool = True):
        """Frozen stages keep BatchNorm in eval mode: their running statistics stay the pretrained ones.

        With ``freeze_bn`` every BatchNorm layer stays in eval mode (its affine weights still train), so
        a step's result does not depend on how the batch is split across processes.
        """
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        name = STAGES[i]
        if name == "stem":
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if name == "head":
            return self.fc(torch.flatten(self.avgpool(x), 1))
        return getattr(self, name)(x)

    def _frozen_prefix(self) -> nn.Module:
        """The frozen stages with every BatchNorm folded into its convolution, for training steps.

        Frozen stages keep BatchNorm in eval mode, so folding is exact (to float rounding), as in
        :func:`fold_batchnorm`; at unfrozen depth 1 these stages are most of a step's forward compute.
        Built on first use and dropped whenever the weights are loaded or moved (``load_state_dict``,
        ``.to()``), so it follows them. Not by a check of each tensor per step: DDP re-broadcasts every
        buffer in place before each forward (the same values on every rank), which would rebuild it every
        step. Kept out of the module tree, so state_dict, DDP and the optimizer never see it."""
        prefix = self.__dict__.get("_prefix_cache")
        if prefix is None:
            prefix = _FoldedPrefix(self, self.first_trainable)
            object.__setattr__(self, "_prefix_cache", prefix)  # not a submodule (see the docstring)
        return prefix

    def __getstate__(self):
        # Copies (fold_batchnorm's deepcopy each validation) and pickles leave the folded stages behind.
        state = self.__dict__.copy()
        state.pop("_prefix_cache", None)
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_prefix_cache", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_prefix_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        k = self.first_trainable
        if k > 0:
            # The frozen prefix needs no autograd graph: this saves its activations' memory and time.
            with torch.no_grad():
                # Only where the frozen stages' BatchNorm is in eval mode (train() puts it there; a module
                # that was never switched still normalises by batch statistics, which cannot be folded).
                # torch.compile traces the plain stages (it does its own fusing).
                if (self.training and not torch.compiler.is_compiling()
                        and not any(m.training for f in self.frozen_modules() for m in f.modules())):
                    x = self._frozen_prefix()(x)
                else:
                    for i in range(k):
                        x = self._run_stage(i, x)
            if self.dropout > 0:
                # Dropout where frozen features enter the trainable part (the report: 0.5 before layer4).
                x = F.dropout(x, self.dropout, self.training)
        for i in range(k, len(STAGES)):
            x = self._run_stage(i, x)
        return x


def fold_batchnorm(model: MultiLabelResNet, dtype: torch.dtype | None = None) -> MultiLabelResNet:
    """A copy for scoring with every BatchNorm folded into the convolution before it (eval mode only).

    An eval-mode BatchNorm is a per-channel scale and shift, which the preceding convolution's weights and
    bias can absorb: the network computes the same function (to float rounding) with 53 fewer passes over
    the activations. Measured 1.14x prediction img/s on the 2-core dev CPU (bf16, batch 16). The original
    is left alone: checkpoints keep plain torchvision keys.

    ``dtype``: the autocast precision the copy will run under (bf16, fp16). Its weights are cast to it once
    here: autocast would cast fp32 weights again on every forward pass (no cache outside autograd), and it
    runs every convolution and the head in that precision anyway, so the scores are the same bits
    (1.03x prediction img/s, bf16 on the dev CPU).
    """
    was_training = model.training
    model.eval()
    folded = copy.deepcopy(model).eval()
    model.train(was_training)
    _fold(folded, "conv1", "bn1")
    for stage in (folded.layer1, folded.layer2, folded.layer3, folded.layer4):
        _fold_blocks(stage)
    # The folded weights are new tensors: back to channels_last, the layout mlc's inputs have.
    return folded.to(dtype=dtype, memory_format=torch.channels_last)


def _fold(owner: nn.Module, conv: str, bn: str) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
    setattr(owner, bn, nn.Identity())


def _fold_blocks(stage: nn.Sequential) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for block in stage:
        for i in (1, 2, 3):
            _fold(block, f"conv{i}", f"bn{i}")
        if block.downsample is not None:
            block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))


class _FoldedPrefix(nn.Module):
    """Copies of a model's first ``k`` stages (stem, layer1, ...) with BatchNorm folded, weights frozen."""

    def __init__(self, model: MultiLabelResNet, k: int):
        super().__init__()
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        # (a new convolution; the frozen stem's modules are in eval mode, as _forward_impl checks)
        self.stem = nn.Sequential(fuse_conv_bn_eval(model.conv1, model.bn1), nn.ReLU(inplace=True),
                                  copy.deepcopy(model.maxpool))
        self.stages = nn.ModuleList()
        for name in STAGES[1:k]:
            stage = copy.deepcopy(getattr(model, name)).eval()
            _fold_blocks(stage)
            self.stages.append(stage)
        self.requires_grad_(False).eval()
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


def bare_module(model: nn.Module) -> nn.Module:
    """The module inside DDP's and torch.compile's wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def bare_state_dict(model: nn.Module) -> dict:
    """The unwrapped module's weights (no DDP ``module.`` or torch.compile ``_orig_mod.`` prefixes), on CPU."""
    return {k: v.detach().to("cpu").clone() for k, v in strip_prefixes(bare_module(model).state_dict()).items()}


def build_model(num_classes: int, unfrozen_depth: int = 1, dropout: float = 0.0,
                weights: str | dict | None = "none", log=print, freeze_bn: bool = False) -> MultiLabelResNet:
    model = MultiLabelResNet(num_classes, unfrozen_depth, dropout, freeze_bn)
    state = load_weights(weights) if isinstance(weights, str) else weights
    if state is not None:
        fc_shape = tuple(state.get("fc.weight", torch.empty(0)).shape)
        if fc_shape != tuple(model.fc.weight.shape):
            # ImageNet's 1000-way head (or another vocabulary's) cannot serve our labels: start the head fresh.
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            log(f"weights: head {fc_shape} does not match {num_classes} labels; the head starts fresh")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(f"weights do not fit ResNet50: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def trainable_parameter_groups(model: nn.Module, weight_decay: float, text_lr: float | None = None) -> list[dict]:
    """Weight decay on conv/linear weights only (decaying BatchNorm scales and biases only hurts), and none on
    a caption embedding (``text.``, mlc.model.fusion): a word seen in few captions would be pulled to zero between
    its rare updates. ``text_lr``: the caption embedding's own learning rate (see mlc.model.fusion.text_lr_scale)."""
    decay, no_decay, text = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.startswith("text."):
                text.append(p)
            else:
                (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if text:
        groups.append({"params": text, "weight_decay": 0.0, **({"lr": text_lr} if text_lr else {})})
    return groups
