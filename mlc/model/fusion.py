"""The networks for each ``--inputs``: the image ResNet50 alone, a caption encoder alone, or both fused.

* ``image``: :class:`mlc.model.resnet.MultiLabelResNet`, a plain torchvision ResNet50 (``best/model.pt`` loads into
  ``torchvision.models.resnet50(num_classes=N)``).
* ``caption``: :class:`CaptionModel`, an embedding bag over the caption's tokens (:mod:`mlc.data.tokenizer`) and a
  linear head. It never touches an image.
* ``image+caption``: :class:`ImageCaptionModel`, the ResNet50's 2048 pooled features and the caption's
  embedding concatenated before one linear head (late fusion: each branch keeps its own inputs' scale).

Every network is called as ``model(*inputs)`` with the inputs :func:`mlc.data.transforms.batch_to_device` gives for
its kind: ``(images,)``, ``(token_ids, offsets)`` or ``(images, token_ids, offsets)``. State dict keys:
``image.*`` (torchvision names under a prefix, no ``fc``), ``text.bag.weight``, ``head.weight``/``head.bias``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mlc.config import INPUTS
from mlc.model.resnet import MultiLabelResNet, WeightsError, build_model, fold_batchnorm, load_weights

__all__ = ["INPUTS", "build", "for_scoring", "head", "uses_captions", "uses_images"]
# 128 dimensions: measured on the real captions, 64 scored 0.848 and 128 0.849 (sample-F1); the head sees
# 2048 image features beside them.
TEXT_DIM = 128


# The caption embedding's rows start near zero and each moves only in the steps whose captions hold its
# token, so how far it gets depends on the number of optimizer steps: it learns at
# max(1, TEXT_LR_STEPS / steps) times --lr, the same total movement on a short run as on a long one, capped
# at TEXT_LR_MAX_SCALE. Measured with --inputs caption on the real tables (80/20 split, validation
# sample-F1; docs/measurements.md has the table): 2,008 rows, 500 steps: 0.658 at x1 (label prior 0.618,
# linear baseline 0.786), 0.791 at x3, 0.814 at x10, 0.812 at x30; all 30,000 rows, 7,500 steps: 0.861,
# 0.859, 0.858, 0.855.
TEXT_LR_STEPS = 4000
TEXT_LR_MAX_SCALE = 30.0


def text_lr_scale(steps: int) -> float:
    """The caption embedding's learning rate as a multiple of --lr, for a run of ``steps`` optimizer steps."""
    return min(TEXT_LR_MAX_SCALE, max(1.0, TEXT_LR_STEPS / max(1, steps)))


class CaptionEncoder(nn.Module):
    """Sum of the caption's token embeddings divided by sqrt(token count).

    The sqrt keeps a long caption's vector from growing with its length while letting it weigh more than one
    word (measured against the plain mean on the real captions: 0.849 vs 0.848 sample-F1 with char trigrams,
    0.839 vs 0.843 without). An empty caption is an empty bag: a zero vector.
    """

    def __init__(self, num_tokens: int, dim: int = TEXT_DIM):
        super().__init__()
        self.bag = nn.EmbeddingBag(num_tokens, dim, mode="sum")
        with torch.no_grad():
            # Small, as fastText starts its word vectors (uniform in +-1/dim), not torch's N(0, 1): the few
            # words that carry a caption's labels then outgrow the random start of the others within an epoch.
            self.bag.weight.uniform_(-1.0 / dim, 1.0 / dim)
            # Id 0 is the unknown word. With every training word in the vocabulary it never occurs in
            # training, so it would keep a random vector: zero adds nothing to a caption's embedding.
            self.bag.weight[0].zero_()
        self.dim = dim

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ends = torch.cat([offsets[1:], offsets.new_tensor([ids.numel()])])
        counts = (ends - offsets).clamp(min=1).to(self.bag.weight.dtype)
        weights = torch.repeat_interleave(counts.rsqrt(), ends - offsets, output_size=ids.numel())
        return self.bag(ids, offsets, per_sample_weights=weights)


class CaptionModel(nn.Module):
    def __init__(self, num_classes: int, num_tokens: int, dropout: float = 0.2, dim: int = TEXT_DIM):
        super().__init__()
        self.text = CaptionEncoder(num_tokens, dim)
        # 0.2 on the caption vector: measured on the real captions, the head overfits within 3 epochs without.
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids, offsets):
        return self.head(self.drop(self.text(ids, offsets)))


class ImageCaptionModel(nn.Module):
    def __init__(self, num_classes: int, num_tokens: int, unfrozen_depth: int = 1, dropout: float = 0.0,
                 freeze_bn: bool = False, text_dropout: float = 0.2, dim: int = TEXT_DIM):
        super().__init__()
        self.image = MultiLabelResNet(num_classes, unfrozen_depth, dropout, freeze_bn)
        self.image.fc = nn.Identity()  # the 2048 pooled features; the fused head classifies
        self.text = CaptionEncoder(num_tokens, dim)
        self.drop = nn.Dropout(text_dropout)
        self.head = nn.Linear(2048 + dim, num_classes)

    def forward(self, x, ids, offsets):
        feats = self.image(x)
        words = self.drop(self.text(ids, offsets))
        return self.head(torch.cat([feats.float(), words.float()], 1))


def build(inputs: str, num_classes: int, *, num_tokens: int = 0, unfrozen_depth: int = 1, dropout: float = 0.0,
          weights: str | dict | None = "none", freeze_bn: bool = False, log=print) -> nn.Module:
    """The network for ``inputs``. ``weights``: a whole network's state dict (a checkpoint or a resume), or
    for the image branch ``imagenet``/``none``/a ResNet50 state dict's path, as ``--weights`` takes."""
    if inputs == "image":
        return build_model(num_classes, unfrozen_depth, dropout, weights=weights, log=log, freeze_bn=freeze_bn)
    if inputs not in INPUTS:
        raise ValueError(f"--inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    if num_tokens < 1:
        raise ValueError(f"--inputs {inputs} needs a tokenizer (num_tokens >= 1)")
    if inputs == "caption":
        model = CaptionModel(num_classes, num_tokens)
    else:
        model = ImageCaptionModel(num_classes, num_tokens, unfrozen_depth, dropout, freeze_bn)
    if isinstance(weights, dict) and any(k.startswith(("text.", "head.")) for k in weights):
        _load_whole(model, weights)
    elif inputs == "image+caption":
        state = load_weights(weights) if isinstance(weights, str) else weights
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the fused head is ours
            missing, unexpected = model.image.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise WeightsError(f"weights do not fit ResNet50: missing {missing[:5]}, unexpected {unexpected[:5]}")
    elif weights not in (None, "none", "imagenet"):
        raise WeightsError(f"--weights {weights}: a caption model has no image branch to load it into")
    return model


def _load_whole(model: nn.Module, state: dict) -> None:
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing, unexpected = model.load_state_dict(state, strict=False) if not wrong else ([], [])
    if wrong or missing or unexpected:
        raise WeightsError(f"the saved network does not fit this one (inputs, labels or tokenizer differ): "
                           f"shape {wrong[:3]}, missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")


def for_scoring(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy to score with under autocast to ``dtype``: BatchNorm folded into the convolutions of any image
    branch, which runs in ``dtype`` (see :func:`mlc.model.resnet.fold_batchnorm`); the caption model has nothing
    to fold, and stays fp32 (autocast keeps its embedding bag in fp32)."""
    if isinstance(model, MultiLabelResNet):
        return fold_batchnorm(model, dtype)
    was = model.training
    model.eval()
    out = copy.deepcopy(model).eval()
    model.train(was)
    if isinstance(out, ImageCaptionModel):
        out.image = fold_batchnorm(out.image, dtype)
    return out


def head(model: nn.Module) -> nn.Linear:
    """The final linear layer, whatever the kind (its ``out_features`` is the label count)."""
    model = getattr(model, "module", model)
    return model.fc if isinstance(model, MultiLabelResNet) else model.head
