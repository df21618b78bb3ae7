"""torchrun helpers: join the process group, shard splits, reduce counts, print on rank 0.

Without torchrun (no WORLD_SIZE > 1 in the environment) everything is a single process and
every helper is a no-op, so the same code path serves both. Reductions run on the backend's
device (CUDA tensors for NCCL, CPU tensors for gloo).
"""
from __future__ import annotations

import builtins
import contextlib
import datetime
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

from utils import ToolError, UsageError, resolve_device

#: How long a collective may wait for a slow rank before failing (shards of a sweep can be
#: uneven: early stop makes some samples cheap). A rank that dies is noticed by torchrun,
#: which stops the others at once; this timeout only ends a rank that hangs.
DEFAULT_TIMEOUT_S = 1800


@dataclass
class Dist:
    """This process's place in the job (a single process when ``world_size`` is 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """The contiguous, unpadded share of ``n`` samples this rank owns (in rank order)."""
        return range(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def _backend_device(self) -> torch.device:
        return self.device if self.active and torch_dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks (returned on its own device)."""
        if not self.active:
            return tensor
        work = tensor.to(self._backend_device()).clone()
        torch_dist.all_reduce(work, op=torch_dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def sum_float(self, value: float) -> float:
        return float(self.sum(torch.tensor([value], dtype=torch.float64)).item())

    def max_float(self, value: float) -> float:
        if not self.active:
            return value
        work = torch.tensor([value], dtype=torch.float64, device=self._backend_device())
        torch_dist.all_reduce(work, op=torch_dist.ReduceOp.MAX)
        return float(work.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        objects: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(objects, obj)
        return objects

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` in place with rank ``src``'s copy."""
        if not self.active:
            return
        work = tensor.to(self._backend_device())
        torch_dist.broadcast(work, src)
        if work is not tensor:
            tensor.copy_(work)


def init_distributed(device_name: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the torchrun process group (if any) and pick this rank's device.

    Under torchrun with CUDA each local rank takes its own GPU; asking for CUDA with fewer GPUs
    than local ranks is a usage error naming both numbers. CPU jobs use gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device_name)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < local_world:
            raise UsageError(f"--device cuda under torchrun needs one GPU per local process: {local_world} "
                             f"processes but {gpus} GPU(s); lower --nproc_per_node to {gpus} or use --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(dist: Dist) -> None:
    """Leave the process group (also after an error, so no rank is left waiting on this one)."""
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


class PeerStopped(ToolError):
    """This rank stopped because another rank of the job failed, hung or was stopped."""


def _is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because a peer went away (NCCL/c10d errors, gloo's "Connection
    closed by peer" or timeouts, raised as plain RuntimeErrors from gloo's sources)."""
    return isinstance(err, torch_dist.DistError) or (isinstance(err, RuntimeError) and "/gloo/" in str(err))


def _stopped_by_signal(signum: int, _frame: Any) -> None:
    raise PeerStopped(f"stopped by signal {signal.Signals(signum).name}: torchrun ends every process of the job "
                      "when one fails; the failing process's error is printed above")


@contextlib.contextmanager
def stop_together(dist: Dist) -> Iterator[None]:
    """Under torchrun, end this rank with a one-line error when another rank fails.

    When one rank fails, the others see either a failed collective (its peer closed the
    connection, or the process-group timeout passed) or torchrun's SIGTERM. Both become a
    :class:`PeerStopped` naming the cause, instead of a traceback. Wrap everything up to and
    including :func:`shutdown`, so that a SIGTERM while leaving the group is reported too. A
    single process is unchanged.
    """
    if not dist.active:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stopped_by_signal)
    try:
        yield
    except Exception as err:
        if not _is_peer_failure(err):
            raise
        cause = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(err).split())).split(". ")[0][:120]
        raise PeerStopped(f"process {dist.rank} stopped because another process of this torchrun job failed or "
                          f"hung ({cause}); its error is printed above") from err
    finally:
        signal.signal(signal.SIGTERM, previous)


def setup_for_distributed(is_main: bool) -> Callable[[], None]:
    """Silence ``print`` on every rank but the main one (torchvision's habit); ``print(...,
    force=True)`` still prints. Returns a function that restores the original ``print``."""
    original = builtins.print

    def print_on_main(*args: Any, force: bool = False, **kwargs: Any) -> None:
        if is_main or force:
            original(*args, **kwargs)

    builtins.print = print_on_main
    return lambda: setattr(builtins, "print", original)
