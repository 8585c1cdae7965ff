"""Source models: build a timm or torchvision model by name, with weights from a file, a
package that ships them, or the hub, and say where the weights came from.

Every failure is one line naming the problem and the fix: unknown name (with close names),
unreachable hub (``--weights FILE`` / ``--no-pretrained``), unreadable or mismatched weights.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from afconvert.sources.names import ModelSourceError, check_name

__all__ = ["SourceSpec", "create_source_model", "load_weights_file", "read_state_dict", "ModelSourceError"]


@dataclass
class SourceSpec:
    """How to rebuild a source model: ``library`` ('timm' | 'torchvision'), ``name``, ``kwargs``."""

    name: str
    library: str = "timm"
    kwargs: dict = field(default_factory=dict)
    weights: str = "random"          # provenance, for reports only

    def to_dict(self) -> dict:
        return {"name": self.name, "library": self.library, "kwargs": dict(self.kwargs), "weights": self.weights}

    @classmethod
    def from_dict(cls, d: dict) -> "SourceSpec":
        return cls(name=d["name"], library=d.get("library", "timm"), kwargs=dict(d.get("kwargs", {})),
                   weights=d.get("weights", "random"))


def _build(spec: SourceSpec) -> nn.Module:
    if spec.library == "timm":
        import timm
        return timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    import torchvision
    return torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)


def load_error(exc: Exception) -> str:
    """What went wrong in ``torch.load(weights_only=True)``, in a few words. A pickled Python object is
    *refused* (never loaded: unpickling can run code), with its name; anything else is unreadable."""
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text)
    if found or "Unsupported global" in text:
        name = found.group(1) if found else "a Python object"
        return f"refused: it holds a pickled Python object ({name}) and afconvert never unpickles code from a file"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "Weights only load failed" in first:
        first = "not a torch file, or corrupt"
    return f"unreadable: {first}"


def read_state_dict(path: str | Path) -> dict:
    """Load a checkpoint file safely (``weights_only=True``; safetensors too) and return its raw object."""
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        from afconvert.sources.official_afc import safe_globals
        with safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelSourceError(f"cannot read weights file {path}: {load_error(exc)}; fix: pass a state_dict / "
                               f"checkpoint of tensors saved with torch.save (or a .safetensors file)") from exc


def _unwrap(obj) -> dict:
    """The state_dict inside a checkpoint: {'state_dict'|'model'|'module'|'model_ema'|...: sd} or sd itself,
    without DDP / torch.compile key prefixes (timm's ``clean_state_dict``)."""
    from timm.models import clean_state_dict
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return clean_state_dict(obj)
    for key in ("state_dict", "model", "module", "model_ema", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return _unwrap(obj[key])
    raise ModelSourceError("the weights file holds no state_dict (a dict of tensors, or one under "
                           "'state_dict' / 'model'); fix: save model.state_dict()")


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file strictly into ``model``, with a one-line error on any mismatch; an afconvert
    checkpoint's data config (how the weights were trained) becomes the model's."""
    raw = read_state_dict(path)
    sd = _unwrap(raw)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise ModelSourceError(f"weights {path} do not fit {type(model).__name__}: {'; '.join(parts)}; fix: pass "
                               f"the weights of this architecture (and --num-classes if the head differs)")
    model.load_state_dict(sd, strict=True)
    if isinstance(raw, dict) and isinstance(raw.get("data_config"), dict):
        from afconvert.data import set_data_config
        set_data_config(model, raw["data_config"])


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_source_model(name: str, weights: str | Path | None = None, pretrained: bool = True,
                        **kwargs) -> tuple[nn.Module, SourceSpec]:
    """Build model ``name`` ('convnext_tiny', 'timm:resnet50', 'torchvision:resnet18').

    Weights: ``weights`` (a file) if given; else, with ``pretrained``, a package that ships them
    (EfficientNet-Lite0) or the hub. Returns the model in eval mode and its ``SourceSpec``.
    """
    library, arch = check_name(name)
    spec = SourceSpec(arch, library, dict(kwargs))
    if library == "timm" and arch in ("efficientnet_lite0", "tf_efficientnet_lite0") and weights is None and pretrained:
        from afconvert.sources import efficientnet_lite0 as lite0
        if lite0.packaged_weights_path() is not None:
            model = lite0.load_timm_model(**kwargs)
            spec = SourceSpec(lite0.TIMM_MODEL, "timm", dict(kwargs),
                              weights=f"package {lite0.PIP_NAME} (ImageNet), mapped onto {lite0.TIMM_MODEL}")
            return model.eval(), spec
    model = _build(spec)
    if weights is not None:
        load_weights_file(model, weights)
        spec.weights = f"file {weights}"
    elif pretrained:
        if library != "timm":
            raise ModelSourceError(f"no offline weights for torchvision:{arch}: fix: pass --weights FILE "
                                   f"(a state_dict) or --no-pretrained for random weights")
        if not _hub_reachable():
            raise ModelSourceError(f"cannot reach the weights hub for '{arch}' (offline); fix: pass --weights FILE "
                                   f"(a local checkpoint) or --no-pretrained for random weights")
        import timm
        try:
            model = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelSourceError(f"cannot fetch pretrained weights for '{arch}' ({first}); fix: pass "
                                   f"--weights FILE or --no-pretrained") from exc
        spec.weights = "hub (timm pretrained)"
    return model.eval(), spec
