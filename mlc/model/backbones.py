"""Image backbones other than torchvision's ResNet50 (``--model NAME``): any timm model, with timm as the optional
extra ``mlc[timm]``.

A timm network stays timm's own module (its state dict loads into ``timm.create_model(NAME, num_classes=N)``),
with three things added by a subclass of its own class (:class:`_Staged`): the stages that do not train keep
their parameters frozen and their normalisation layers in eval mode, ``--freeze-bn`` keeps every BatchNorm in
eval mode, and ``--dropout`` applies where the frozen stages' output enters the trainable ones, as for ResNet50.

Stages are timm's own coarse parameter groups (``group_matcher(coarse=True)``, the groups of its layer-wise
learning-rate decay): the first is the stem, the last the head, the ones between the stages. ``--unfrozen-depth
k`` trains the head and the last k stages; k at or above the model's stage count trains everything, stem
included (ResNet50: 4 stages, as before).
"""

from __future__ import annotations

import os

import torch.nn.functional as F
from torch import nn

from mlc.errors import UsageError

TORCHVISION = "resnet50"  # torchvision's ResNet50: the default, and the network of every earlier checkpoint
PIP = "pip install 'mlc[timm]'  (or: pip install timm)"


def timm_module(name: str):
    try:
        import timm
    except ImportError:
        raise UsageError(f"--model {name}: timm models need the timm package, which is not installed: {PIP}") from None
    return timm


def check_model(name: str) -> None:
    """Refuse a --model that is neither resnet50 nor a timm model name (exit 2), before anything is written."""
    if name == TORCHVISION:
        return
    timm = timm_module(name)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        raise UsageError(f"--model {name}: not a timm model name" + (f" (close: {', '.join(close)})" if close else "")
                         + "; see timm.list_models(), or use resnet50 (torchvision's)")


class _Staged:
    """Mixed into a timm network's class (see :func:`timm_network`)."""
    mlc_frozen: tuple = ()
    mlc_freeze_bn: bool = False
    mlc_dropout = None  # the _Dropout hook at the frozen stages' output, if any

    def train(self, mode: bool = True):
        super().train(mode)
        if self.mlc_dropout is not None:
            self.mlc_dropout.active = mode  # the hooked module itself is frozen, in eval mode
        for name in self.mlc_frozen:
            self.get_submodule(name).eval()
        if self.mlc_freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


_CLASSES: dict = {}


def _staged_class(cls: type) -> type:
    """One subclass per timm class (so torch.compile and isinstance see a stable type)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Staged{cls.__name__}", (_Staged, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def stage_groups(model: nn.Module) -> list[list[str]]:
    """timm's coarse module groups, stem first and head last: each a list of module names."""
    from timm.models._manipulate import group_modules
    groups = group_modules(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def _param_groups(model: nn.Module) -> list[list[str]]:
    from timm.models._manipulate import group_parameters
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def stage_count(model: nn.Module) -> int:
    return max(0, len(stage_groups(model)) - 2)


def timm_network(name: str, num_classes: int, unfrozen_depth: int, dropout: float, freeze_bn: bool) -> nn.Module:
    """timm's ``name`` with ``num_classes`` outputs (0: its pooled features), its last ``unfrozen_depth`` stages
    and head trainable."""
    timm = timm_module(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    modules, params = stage_groups(model), _param_groups(model)
    stages = max(0, len(modules) - 2)
    first = 0 if unfrozen_depth >= stages else len(modules) - 1 - unfrozen_depth  # first trainable group
    frozen_params = {p for g in params[:first] for p in g}
    for pname, p in model.named_parameters():
        p.requires_grad_(pname not in frozen_params)
    model.__class__ = _staged_class(type(model))
    model.mlc_frozen = tuple(m for g in modules[:first] for m in g)
    model.mlc_freeze_bn = freeze_bn
    if first > 0 and dropout > 0:
        model.mlc_dropout = _Dropout(dropout)
        model.get_submodule(_boundary(modules[first - 1])).register_forward_hook(model.mlc_dropout)
    return model.train()


def _boundary(group: list[str]) -> str:
    """The module whose output leaves a group: the stage all its modules sit in (``stages.1``), else its last."""
    prefix = os.path.commonprefix([n + "." for n in group])
    prefix = prefix[:prefix.rfind(".")] if "." in prefix else ""
    return prefix or group[-1]


class _Dropout:
    """A forward hook: dropout on a module's output (the frozen stages' features) while the network trains."""

    def __init__(self, p: float):
        self.p, self.active = p, True

    def __call__(self, module, inputs, output):
        return F.dropout(output, self.p, self.active)


def feature_dim(model: nn.Module) -> int:
    return int(model.num_features)
