"""Loading and saving weights without ever running code from a file.

`.safetensors` files hold raw tensors only. PyTorch files are read with `torch.load(weights_only=True)`,
whose unpickler accepts tensors and plain containers and refuses any other global, so a pickle that
carries code is rejected before anything in it runs.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .params import Params

MAX_CHECKPOINT_BYTES = 2 * 1024**3  # files over this are refused (a start network on CIFAR is ~45-80 MB)


def save_weights(params: Params, path: str | Path, buffers: dict | None = None) -> None:
    """Write params (and BatchNorm buffers as 'buffer:NAME') to .safetensors, atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    tensors.update({f"buffer:{k}": v.detach().contiguous().cpu() for k, v in (buffers or {}).items()})
    # A name of its own per writer: processes (a sweep's Ray workers) and threads (the server's sessions) may write
    # the same cached start network at once, and the last complete file wins.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def read_tensors(path: str | Path, max_bytes: int = MAX_CHECKPOINT_BYTES, name: str | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every tensor in a .safetensors or PyTorch state-dict file, read safely. name: what the messages call the
    file (an upload's own name, not the temporary path it was written to)."""
    path = Path(path)
    shown = name or str(path)
    if not path.is_file():
        raise CheckpointError(f"{shown}: no such file")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{shown}: {size / 1e6:.0f} MB is over the {max_bytes / 1e6:.0f} MB limit for weights")
    with path.open("rb") as f:
        head = f.read(9)
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"  # 8-byte header length, then its JSON
    if not (path.suffix == ".safetensors" or looks_safetensors or head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointError(f"{shown}: not a weights file: neither .safetensors nor a PyTorch checkpoint "
                              f"(.pt/.pth, a zip archive or a pickle); it starts with {head[:8]!r}")
    if path.suffix == ".safetensors" or looks_safetensors:
        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{shown}: not a readable .safetensors file ({err})") from err
    try:
        with warnings.catch_warnings():  # PyTorch's note on pickle protocols says nothing the error below does not
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code-carrying pickles, others for truncated files
        reason = _load_failure(str(err))
        raise CheckpointError(f"{shown}: refused to load: only plain tensors are accepted, and this file "
                              f"is not a plain state dict ({type(err).__name__}: {reason})") from err
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{shown}: expected a dict of tensors (a state dict), got {type(loaded).__name__}")
    return loaded


def match_params(tensors: dict[str, torch.Tensor], like: Params, source: str = "checkpoint",
                 buffers: dict | None = None) -> tuple[Params, dict]:
    """(params, buffers) taken from `tensors`, keyed and shaped like the model's; names the first mismatch."""
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    params = {}
    for name, ref in like.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name!r} (shape {tuple(ref.shape)}) for this model")
        value = tensors[name]
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(ref.shape)}")
        _check_finite(value, name, source)
        params[name] = value.to(dtype=ref.dtype, device=ref.device)
    new_buffers = dict(buffers or {})
    for name, ref in (buffers or {}).items():
        value = tensors.get(f"buffer:{name}", tensors.get(name))
        if value is not None and tuple(value.shape) == tuple(ref.shape):
            _check_finite(value, name, source)
            new_buffers[name] = value.to(dtype=ref.dtype, device=ref.device)
    known = set(like) | {f"buffer:{k}" for k in (buffers or {})} | set(buffers or {})
    unexpected = sorted(set(tensors) - known)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} (is it for another model?)")
    return params, new_buffers


def _check_finite(value: torch.Tensor, name: str, source: str) -> None:
    """Weights with NaN or infinite entries: refused before they replace the walk on screen (they started a walk
    that could only diverge, and the user's walk was gone)."""
    if value.is_floating_point() or value.is_complex():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad:,} NaN or infinite value"
                                  f"{'s' if bad > 1 else ''} (of {value.numel():,}): these weights cannot be walked")


def _load_failure(message: str) -> str:
    """The part of torch.load's error that says what is wrong with the file. PyTorch's message also suggests
    loading again with weights_only=False, which would run the file's code: never shown to a user here."""
    detail = message.split("WeightsUnpickler error:", 1)
    if len(detail) == 2:
        return " ".join(detail[1].split("Check the documentation", 1)[0].split())
    return message.split("\n")[0].split(" In PyTorch 2.6", 1)[0]
