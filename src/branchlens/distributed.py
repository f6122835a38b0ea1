"""The one torch.distributed helper (harvest and train): rank and world from torchrun's
environment, collectives that are no-ops in a single process.

gloo on CPU, nccl when the stage computes on CUDA (one GPU per rank: ``cuda:$LOCAL_RANK``).
The process group is created here only when ``WORLD_SIZE > 1`` and none exists; ``close``
destroys it only if this helper created it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor


class Dist:
    def __init__(self, device: torch.device | str | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.owned = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owned = True
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def sum(self, t: Tensor) -> Tensor:
        """All-reduce (sum) in place; on nccl the tensor travels via the rank's GPU."""
        if self.on:
            if t.device != self.device and self.device.type == "cuda":
                on = t.to(self.device)
                self.dist.all_reduce(on)
                t.copy_(on.to(t.device))
            else:
                self.dist.all_reduce(t)
        return t

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """One all-reduce over every gradient, flattened together."""
        if not self.on:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.dist.all_reduce(flat)
        off = 0
        for p in params:
            p.grad.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()

    def bcast(self, obj: Any) -> Any:
        """Rank 0's picklable object on every rank."""
        if not self.on:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.on:
            self.dist.barrier()

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()
