"""Image transforms: random crops and flips for training, deterministic resize + centre crop otherwise.

The 2020 report applied training augmentation at test time; evaluation and
prediction here are deterministic so the same image always gets the same score.
"""

from __future__ import annotations

from torchvision import transforms as T

# The statistics the torchvision ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resize to size/0.875 then crop: torchvision's standard ImageNet evaluation ratio (256 -> 224).
EVAL_CROP_RATIO = 0.875


def train_transform(size: int):
    return T.Compose([
        # scale >= 0.35 rather than ImageNet's 0.08: small crops would cut away the labelled objects.
        T.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size: int):
    return T.Compose([
        T.Resize(int(round(size / EVAL_CROP_RATIO)), antialias=True),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
