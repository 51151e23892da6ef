"""Export of the networks that read captions (``--inputs caption`` and ``image+caption``): a graph that takes the
caption as token ids, and the tokenizer as data and as plain Python, so that a deployment without mlc turns a
caption into the ids mlc would.

The graph's caption inputs are ``token_ids`` (int64, every row's ids one after another) and ``offsets`` (int64,
``(N,)``: where each row's ids start), as ``torch.nn.EmbeddingBag`` takes them; an image+caption graph takes
the uint8 ``images`` first. The bag (:class:`mlc.model.fusion.CaptionEncoder`: the sum of a row's token vectors
over the square root of their count) is written with plain tensor operations here, which TorchScript tracing
and the ONNX exporter keep dynamic in the number of rows and of tokens; ``model.json`` holds the tokenizer
(``tokenizer.json``'s fields) and :data:`TOKENIZER_RECIPE`, Python with ``re`` and ``zlib`` only, which
tests/test_export.py checks against :class:`mlc.data.tokenizer.Tokenizer` on the real captions.
"""

from __future__ import annotations

import torch
from torch import nn

from mlc.data.tokenizer import Tokenizer
from mlc.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# mlc.data.tokenizer.Tokenizer.encode, in plain Python: make_encoder(model.json's input.captions.tokenizer)
# gives encode(text) -> ids; batch(encode, texts) gives the graph's (token_ids, offsets).
TOKENIZER_RECIPE = r'''
import re, zlib

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def make_encoder(tokenizer):
    ids_of = {w: i + 1 for i, w in enumerate(tokenizer["vocab"])}
    base, buckets, max_words = 1 + len(tokenizer["vocab"]), tokenizer["buckets"], tokenizer["max_words"]

    def bucket(text):
        return base + zlib.crc32(text.encode("utf-8")) % buckets

    def encode(text):
        ws = _WORD.findall(text.lower())[:max_words] if isinstance(text, str) else []
        ids = [ids_of.get(w, 0) for w in ws]
        ids += [bucket(a + " " + b) for a, b in zip(ws, ws[1:])]
        for w in ws:
            w = "<" + w + ">"
            ids += [bucket("#" + w[i:i + 3]) for i in range(len(w) - 2)]
        return ids

    return encode


def batch(encode, texts):
    ids, offsets = [], []
    for text in texts:
        offsets.append(len(ids))
        ids += encode(text)
    return ids, offsets
'''


def bag_vectors(weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """What CaptionEncoder computes, ``(N, dim)``, from operations whose sizes follow the inputs when traced: each
    token's row is the count of offsets at or before it, and a row-by-token membership matrix (each token weighted
    by 1/sqrt of its row's length) sums the token vectors."""
    ones = torch.ones_like(ids)
    ends = torch.cat([offsets[1:], ones.sum().view(1)])
    counts = (ends - offsets).clamp(min=1).to(weight.dtype)
    position = torch.cumsum(ones, 0) - 1
    row = (position.unsqueeze(1) >= offsets.unsqueeze(0)).sum(1) - 1
    rows = torch.cumsum(torch.ones_like(offsets), 0) - 1
    member = (rows.unsqueeze(1) == row.unsqueeze(0)).to(weight.dtype) * counts.rsqrt()[row].unsqueeze(0)
    return member @ weight[ids]


class CaptionGraph(nn.Module):
    """(token_ids, offsets) -> probabilities, for a caption network."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.head(bag_vectors(self.model.text.bag.weight, ids, offsets)))


class ImageCaptionGraph(nn.Module):
    """(uint8 images, token_ids, offsets) -> probabilities, for an image+caption network."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255))

    def forward(self, images: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        feats = self.model.image((images.float() - self.mean) * self.inv_std)
        words = bag_vectors(self.model.text.bag.weight, ids, offsets)
        return torch.sigmoid(self.model.head(torch.cat([feats.float(), words.float()], 1)))


def caption_graph(model: nn.Module, inputs: str, size: int) -> tuple[nn.Module, tuple, list]:
    """(the graph, example inputs to trace it with, the input names) of a caption or image+caption network."""
    ids, offsets = torch.tensor([1, 2, 3, 4, 5], dtype=torch.long), torch.tensor([0, 2], dtype=torch.long)
    if inputs == "caption":
        return CaptionGraph(model).eval(), (ids, offsets), ["token_ids", "offsets"]
    images = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    return ImageCaptionGraph(model).eval(), (images, ids, offsets), ["images", "token_ids", "offsets"]


def described_captions(tokenizer: Tokenizer) -> dict:
    """model.json's ``input.captions``: the caption inputs, the tokenizer and its recipe."""
    return {"names": ["token_ids", "offsets"], "dtype": "int64",
            "how": "encode = make_encoder(tokenizer) in `recipe` (plain Python: re, zlib); token_ids, offsets = "
                   "batch(encode, captions): every row's ids one after another, and where each row's start; a row "
                   "without a caption has no ids",
            "tokenizer": tokenizer.to_dict(), "recipe": TOKENIZER_RECIPE}
