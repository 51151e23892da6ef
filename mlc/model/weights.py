"""Initial weights (``--weights``): ``imagenet`` (torchvision's for ResNet50, timm's from the Hugging Face Hub for a
timm model), ``none``, or a state dict: a ``.pt``/``.pth`` file, a ``.safetensors`` file, a model folder (an mlc
``best/`` or run folder, a checkpoint folder, a Hugging Face snapshot folder with ``model.safetensors`` or
``pytorch_model.bin``), at a path or any fsspec URL. Every file is read as data (``torch.load(weights_only=True)``
or safetensors), never unpickled.

Offline, ``imagenet`` comes from the cache its library keeps: torchvision's under ``$TORCH_HOME`` (default
``~/.cache/torch``), timm's under ``$HF_HOME`` (default ``~/.cache/huggingface``); when it is not there the
error (exit 5) names the variable and the folder that would satisfy it.
"""

from __future__ import annotations

import io
import os

import torch

from mlc.io import storage

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# In a folder, the first of these that is there (mlc's own, then a Hugging Face snapshot's).
FOLDER_FILES = ("model.pt", "model.safetensors", "pytorch_model.bin")


class WeightsError(RuntimeError):
    pass


def strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _wanted(spec: str) -> str:
    return (f"--weights {spec}: not found; give imagenet, none, a state dict (.pt, .safetensors), or a folder "
            "holding one (a run, its best/, a Hugging Face snapshot)")


def check_weights_found(spec: str) -> None:
    """A --weights path or URL that is not there fails before any Ray worker starts (a worker's failure would be
    retried --max-failures times first). imagenet is fetched where the model is built."""
    if spec in ("imagenet", "none") or storage.exists(spec):
        return
    raise WeightsError(_wanted(spec))


def weights_file(spec: str) -> str:
    """The file a --weights path names: itself, or the weights file in the folder it names."""
    if not storage.isdir(spec):
        return spec
    inner = storage.join(spec, "best") if storage.exists(storage.join(spec, "best", "model.pt")) else spec
    for name in FOLDER_FILES:
        if storage.exists(storage.join(inner, name)):
            return storage.join(inner, name)
    if storage.exists(storage.join(inner, "state.pt")):  # a checkpoint folder (checkpoint/, epoch_NNNN/)
        return storage.join(inner, "state.pt")
    raise WeightsError(f"--weights {spec}: a folder without {', '.join(FOLDER_FILES)} or state.pt")


def load_weights(spec: str, model: str = "resnet50") -> dict | None:
    """The initial weights of network ``model`` (a --model name): see the module docstring."""
    if spec == "none":
        return None
    if spec == "imagenet":
        return _torchvision_imagenet() if model == "resnet50" else _timm_imagenet(model)
    path = weights_file(spec)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as e:
        raise WeightsError(_wanted(spec)) from e
    state = _safetensors(path, data) if path.endswith(".safetensors") else _torch_file(path, data)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        # An mlc training checkpoint: the weights it validated (the weight average, with --ema).
        state = {**state["model"], **((state.get("ema") or {}).get("weights") or {})}
    if not isinstance(state, dict):
        raise WeightsError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    return strip_prefixes(state)


def _torch_file(path: str, data: bytes):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a state dict"
        raise WeightsError(f"--weights {path}: not a loadable state dict ({e})") from e


def _safetensors(path: str, data: bytes) -> dict:
    try:
        from safetensors.torch import load
    except ImportError:
        raise WeightsError(f"--weights {path}: reading .safetensors needs the safetensors package: "
                           "pip install safetensors") from None
    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - a malformed header or a truncated file
        raise WeightsError(f"--weights {path}: not a readable safetensors file ({e})") from e


def _torchvision_imagenet() -> dict:
    import urllib.error

    from torchvision.models import ResNet50_Weights
    weights = ResNet50_Weights.IMAGENET1K_V2
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return weights.get_state_dict(progress=True)  # torchvision's cache under TORCH_HOME, else a download
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise WeightsError(
            f"could not fetch the ImageNet ResNet50 weights ({weights.url}): {e}. Offline, torchvision reads them "
            f"from TORCH_HOME's cache: put {os.path.basename(weights.url)} in {cache} (or set TORCH_HOME to a folder "
            "whose hub/checkpoints/ holds it); or use --weights none (train from scratch) or --weights PATH_OR_URL "
            "to a state dict you copied beforehand (.pt or .safetensors; local path, gs://..., any fsspec URL).") from e


def _timm_imagenet(model: str) -> dict:
    from mlc.model.backbones import timm_module
    timm = timm_module(model)
    try:
        from huggingface_hub import constants
        cache = constants.HF_HUB_CACHE
    except ImportError:
        cache = os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    try:
        return timm.create_model(model, pretrained=True).state_dict()
    except Exception as e:  # noqa: BLE001 - offline, no such weights, a hub error: each means "cannot have them"
        hub_id = timm.models.get_pretrained_cfg(model).hf_hub_id if timm.models.get_pretrained_cfg(model) else None
        raise WeightsError(
            f"could not fetch the ImageNet weights of {model} ({hub_id or 'no Hugging Face Hub id'}): "
            f"{type(e).__name__}: {str(e)[:300]}. Offline, timm reads them from HF_HOME's cache: {cache} must hold "
            f"the Hub snapshot of {hub_id or model} (set HF_HOME to the folder whose hub/ holds it, with "
            "HF_HUB_OFFLINE=1), or use --weights none, or --weights FILE.safetensors / a snapshot folder.") from e
