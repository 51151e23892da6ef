"""The networks for each ``--inputs``: the image network alone, a caption encoder alone, or both fused, and how
initial weights are loaded into each (:func:`build`).

* ``image``: the backbone ``--model`` names with a head sized to the labels: torchvision's ResNet50
  (:class:`mlc.model.resnet.MultiLabelResNet`; ``best/model.pt`` loads into ``torchvision.models.resnet50(
  num_classes=N)``), or a timm model (:mod:`mlc.model.backbones`; loads into ``timm.create_model(NAME,
  num_classes=N)``).
* ``caption``: :class:`CaptionModel`, an embedding bag over the caption's tokens (:mod:`mlc.data.tokenizer`) and a
  linear head. It never touches an image.
* ``image+caption``: :class:`ImageCaptionModel`, the backbone's pooled features (ResNet50's 2048) and the
  caption's embedding concatenated before one linear head (late fusion: each branch keeps its own inputs' scale).

Every network is called as ``model(*inputs)`` with the inputs :func:`mlc.data.transforms.batch_to_device` gives for
its kind: ``(images,)``, ``(token_ids, offsets)`` or ``(images, token_ids, offsets)``. State dict keys:
``image.*`` (the backbone's names under a prefix, without its classifier), ``text.bag.weight``,
``head.weight``/``head.bias``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mlc.config import INPUTS, uses_captions
from mlc.model.backbones import TORCHVISION, feature_dim, timm_network
from mlc.model.resnet import MultiLabelResNet, fold_batchnorm
from mlc.model.weights import WeightsError, load_weights

__all__ = ["INPUTS", "build", "for_scoring", "head"]
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
    def __init__(self, num_classes: int, num_tokens: int, image: nn.Module, features: int,
                 text_dropout: float = 0.2, dim: int = TEXT_DIM):
        super().__init__()
        self.image = image  # its pooled features: the fused head classifies
        self.text = CaptionEncoder(num_tokens, dim)
        self.drop = nn.Dropout(text_dropout)
        self.head = nn.Linear(features + dim, num_classes)

    def forward(self, x, ids, offsets):
        feats = self.image(x)
        words = self.drop(self.text(ids, offsets))
        return self.head(torch.cat([feats.float(), words.float()], 1))


def image_network(model: str, num_classes: int, unfrozen_depth: int, dropout: float, freeze_bn: bool,
                  features: bool = False) -> tuple[nn.Module, int]:
    """``(network, pooled feature size)`` of backbone ``model``: with ``num_classes`` outputs, or (``features``)
    its pooled features."""
    if model == TORCHVISION:
        # (built with its head, then without: the random draws of a fused network's start as before)
        net = MultiLabelResNet(num_classes, unfrozen_depth, dropout, freeze_bn)
        if features:
            net.fc = nn.Identity()
        return net, 2048
    net = timm_network(model, 0 if features else num_classes, unfrozen_depth, dropout, freeze_bn)
    return net, feature_dim(net)


def classifier_prefix(net: nn.Module) -> str:
    """The state-dict prefix of an image network's own classifier (``fc.`` for ResNet50)."""
    if isinstance(net, MultiLabelResNet):
        return "fc."
    return net.pretrained_cfg["classifier"] + "."


def build(inputs: str, num_classes: int, *, model: str = TORCHVISION, num_tokens: int = 0, unfrozen_depth: int = 1,
          dropout: float = 0.0, weights: str | dict | None = "none", freeze_bn: bool = False, log=print) -> nn.Module:
    """The network for ``inputs`` with backbone ``model``. ``weights``: a state dict (a checkpoint's, a resume's),
    or as ``--weights`` takes them (:func:`mlc.model.weights.load_weights`): an image network's, a caption or
    fused network's (a run's), each loaded into what it fits (:func:`start_from`)."""
    if inputs not in INPUTS:
        raise ValueError(f"--inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    if uses_captions(inputs) and num_tokens < 1:
        raise ValueError(f"--inputs {inputs} needs a tokenizer (num_tokens >= 1)")
    if inputs == "image":
        net, _ = image_network(model, num_classes, unfrozen_depth, dropout, freeze_bn)
    elif inputs == "caption":
        net = CaptionModel(num_classes, num_tokens)
    else:
        image, features = image_network(model, num_classes, unfrozen_depth, dropout, freeze_bn, features=True)
        net = ImageCaptionModel(num_classes, num_tokens, image, features)
    state = load_weights(weights, model) if isinstance(weights, str) else weights
    if state is not None:
        start_from(net, inputs, state, log)
    return net


def start_from(net: nn.Module, inputs: str, state: dict, log=print) -> None:
    """Load ``state`` into ``net`` where it fits: an image network's (torchvision's, timm's, an image run's) into
    the image network or a fused one's image branch; a fused run's into a fused network, its image branch into
    an image network, its caption embedding into a caption network. A head that does not fit (another label
    set, ImageNet's 1000 classes, a fused head for a caption network) starts fresh; anything else that does not
    fit is refused."""
    # A caption or fused network's weights, not an image network's: those have a caption embedding (an image
    # network's own keys may start with head., as timm's ConvNeXt's do, or image.).
    whole = any(k.startswith("text.") for k in state)
    if inputs == "image":
        if whole:
            state = {k[len("image."):]: v for k, v in state.items() if k.startswith("image.")}
        if not state:
            raise WeightsError("--weights: a caption network's weights have no image network to start from")
        load_matching(net, state, heads=(classifier_prefix(net),), log=log)
    elif inputs == "caption":
        if not whole:
            raise WeightsError("--weights: an image network's weights; a caption model has no image branch to load "
                               "them into")
        load_matching(net, {k: v for k, v in state.items() if k.startswith(("text.", "head."))}, heads=("head.",),
                      log=log)
    else:
        if not whole:
            state = {"image." + k: v for k, v in state.items()}
        load_matching(net, state, heads=("head.", "image." + classifier_prefix(net.image)), log=log)


def load_matching(net: nn.Module, state: dict, *, heads: tuple, log=print) -> None:
    """``state`` into ``net``: keys under ``heads`` that are absent or shaped otherwise start fresh (logged); every
    other key must fit."""
    own = net.state_dict()
    fits = lambda k, v: k in own and tuple(v.shape) == tuple(own[k].shape)  # noqa: E731
    fresh = sorted({k for k in own if k.startswith(heads) and not (k in state and fits(k, state[k]))})
    state = {k: v for k, v in state.items() if not k.startswith(heads) or fits(k, v)}
    wrong = [k for k, v in state.items() if k in own and not fits(k, v)]
    missing, unexpected = net.load_state_dict(state, strict=False) if not wrong else ([], [])
    missing = [k for k in missing if k not in fresh]
    if wrong or missing or unexpected:
        raise WeightsError(f"the weights do not fit this network (backbone, inputs, labels or tokenizer differ): "
                           f"shape {wrong[:3]}, missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    if fresh:
        log(f"weights: the head ({', '.join(sorted({k.rsplit('.', 1)[0] for k in fresh}))}) does not fit these "
            "labels; it starts fresh")


def for_scoring(model: nn.Module, dtype: torch.dtype | None = None, tta: str = "none") -> nn.Module:
    """A copy to score with under autocast to ``dtype``: BatchNorm folded into the convolutions of a ResNet50
    image branch, which runs in ``dtype`` (see :func:`mlc.model.resnet.fold_batchnorm`); the caption model has
    nothing to fold, and stays fp32 (autocast keeps its embedding bag in fp32). ``tta`` flip: the copy scores
    each image and its mirror (:class:`FlipAverage`)."""
    if isinstance(model, MultiLabelResNet):
        out = fold_batchnorm(model, dtype)
    else:
        was = model.training
        model.eval()
        out = copy.deepcopy(model).eval()
        model.train(was)
        if isinstance(out, ImageCaptionModel) and isinstance(out.image, MultiLabelResNet):
            out.image = fold_batchnorm(out.image, dtype)
    return FlipAverage(out) if tta == "flip" and not isinstance(out, CaptionModel) else out


class FlipAverage(nn.Module):
    """``--tta flip``: the mean of the probabilities of an image and of its mirror (left-right), as a logit, so
    that every caller (scoring, validation's loss, serving, export) takes it as the network's own output. The
    mean is taken in log space: ``log p = logaddexp(log p1, log p2) - log 2``, and likewise ``log(1 - p)``, so a
    confident score keeps its precision."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, *rest):
        a, b = self.model(x, *rest).float(), self.model(torch.flip(x, dims=(3,)), *rest).float()
        log_p = torch.logaddexp(F.logsigmoid(a), F.logsigmoid(b))
        log_q = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(-b))
        return log_p - log_q  # the log 2 of each mean cancels


def head(model: nn.Module) -> nn.Linear:
    """The final linear layer, whatever the kind (its ``out_features`` is the label count)."""
    model = getattr(model, "module", model)
    if isinstance(model, FlipAverage):
        model = model.model
    if isinstance(model, MultiLabelResNet):
        return model.fc
    if isinstance(model, (CaptionModel, ImageCaptionModel)):
        return model.head
    return model.get_classifier()
