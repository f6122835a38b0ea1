"""Which device a stage computes on. One helper, read by harvest, train, viz and ``Run``."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to torch as is, refused up
    front when this machine lacks it (else a later load fails and blames the wrong file)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device} does not exist: this machine has {n} CUDA "
                             f"device(s); use cuda:0 .. cuda:{n - 1} or --device cpu")
    return dev
