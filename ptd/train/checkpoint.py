"""Checkpoints: safetensors for weights (no code runs on load), written atomically.

A model file carries its architecture (``ptd_spec``) as JSON in the safetensors metadata, so it
can be rebuilt and loaded without anything else. Optimizer/scheduler state for resuming goes
through torch.save and is read back with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ptd.errors import PtdError


class CheckpointError(PtdError, ValueError):
    """A checkpoint that cannot be used; one-line message with the fix."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: a kill leaves the old file or the new, never half
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_json(path: str | Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    _atomic(Path(path), w)


def write_text(path: str | Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(Path(path), w)


def save_model(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """State dict (contiguous CPU copies) + the architecture spec as metadata."""
    from ptd.pruning.masks import unwrap

    model = unwrap(model)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "ptd-model-1"}
    if getattr(model, "ptd_spec", None) is not None:
        meta["ptd_spec"] = json.dumps(model.ptd_spec, sort_keys=True)
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    save_tensors(path, sd, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or a torch file (weights_only=True: no code from the file runs)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}; give the path of a .safetensors or .pt file")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0]}); re-export it with safetensors.torch.save_file") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; all mean the same to the user
        raise CheckpointError(f"{p}: cannot be read as a weights-only torch checkpoint ({str(e).splitlines()[0][:160]}); save a plain state_dict with torch.save(model.state_dict(), path) or use .safetensors") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: holds no state_dict of tensors; save torch.save(model.state_dict(), path)")
    # Checkpoints saved from DDP or torch.compile carry prefixes the bare model does not have.
    out = {}
    for k, v in obj.items():
        for pre in ("module.", "_orig_mod."):
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def load_into(model: nn.Module, path: str | Path, what: str = "model") -> None:
    """Load weights into ``model``, or raise a one-line CheckpointError saying what does not fit."""
    from ptd.pruning.masks import unwrap

    model = unwrap(model)
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        arch = getattr(model, "ptd_spec", {}).get("arch", type(model).__name__)
        detail = []
        if wrong:
            detail.append(f"{len(wrong)} shape mismatches (first: {wrong[0]})")
        if missing:
            detail.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        meta_arch = ""
        if Path(path).suffix == ".safetensors":
            spec = read_metadata(path).get("ptd_spec")
            if spec:
                meta_arch = f" (the file says it holds {json.loads(spec).get('arch')})"
        raise CheckpointError(
            f"{path}: does not fit the {what} architecture {arch}{meta_arch}: {'; '.join(detail)}; "
            f"set the {what}'s model (arch/width/kwargs) to the one the checkpoint was trained with"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model from a ptd safetensors file (architecture from its metadata) and load it."""
    from ptd.models import build_from_spec

    meta = read_metadata(path)
    if "ptd_spec" not in meta:
        raise CheckpointError(f"{path}: carries no ptd architecture metadata; load it into a model you build (ptd.train.checkpoint.load_into)")
    model = build_from_spec(json.loads(meta["ptd_spec"]))
    load_into(model, path)
    return model


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    return torch.load(str(path), map_location="cpu", weights_only=True)
