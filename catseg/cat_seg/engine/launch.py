"""Run a function in one or several processes (torch.distributed), detectron2's ``launch`` without detectron2.

- Under ``torchrun`` (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` variables are set), this
  process is one rank: the process group is initialised from the environment.
- Otherwise, with ``num_processes > 1``, the processes are started with
  ``torch.multiprocessing.spawn`` and meet at ``dist_url`` (``auto``: a free local TCP port).
- One process: the function simply runs here, without a process group.

The backend is NCCL for CUDA and gloo otherwise (so ``--device cpu --num-gpus 2`` runs two CPU
processes, which is how the tests exercise the distributed code).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "backend_for",
    "barrier",
    "find_free_port",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "launch",
    "reduce_mean",
    "resolve_dist_url",
    "torchrun_world",
]

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, rank on this machine, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_world(env: Mapping[str, str] | None = None) -> DistInfo | None:
    """This process's place under ``torchrun`` (from its environment variables), or None."""
    env = os.environ if env is None else env
    if not all(k in env for k in _TORCHRUN_VARIABLES):
        return None
    return DistInfo(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))


def find_free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_dist_url(url: str) -> str:
    """``auto`` -> ``tcp://127.0.0.1:<free port>``; anything else is returned unchanged."""
    return f"tcp://127.0.0.1:{find_free_port()}" if url == "auto" else url


def backend_for(device_type: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def launch(
    worker: Callable[..., Any],
    *,
    num_processes: int,
    device_type: str,
    dist_url: str = "auto",
    args: tuple[Any, ...] = (),
) -> Any:
    """Call ``worker(dist_info, *args)`` in every process of the run.

    Args:
        worker: a picklable (module-level) function; its return value is returned for single-process
            and torchrun runs (spawned runs return None).
        num_processes: processes to spawn when not under torchrun.
        device_type: ``cuda`` (NCCL; process ``i`` uses GPU ``i``) or ``cpu``/``mps`` (gloo).
        dist_url: rendezvous URL of spawned runs, or ``auto``.
        args: more arguments for ``worker`` (pickled to spawned processes).
    """
    backend = backend_for(device_type)
    info = torchrun_world()
    if info is not None:
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, init_method="env://")
        try:
            return worker(info, *args)
        finally:
            dist.destroy_process_group()
    if num_processes == 1:
        return worker(DistInfo(), *args)
    url = resolve_dist_url(dist_url)
    logger.info("spawning %d processes (%s, %s)", num_processes, backend, url)
    from ..data.registry import registered_domain_specs

    mp.spawn(
        _spawned,
        nprocs=num_processes,
        args=(worker, num_processes, backend, device_type, url, args, registered_domain_specs()),
        join=True,
    )
    return None


def _spawned(
    local_rank: int,
    worker: Callable[..., Any],
    world_size: int,
    backend: str,
    device_type: str,
    url: str,
    args: tuple[Any, ...],
    domain_specs: Sequence[Any] = (),
) -> None:
    from ..data.registry import register_domain_spec

    for spec in domain_specs:  # the parent's domains of your own (a spawned process starts afresh)
        register_domain_spec(spec)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=url, world_size=world_size, rank=local_rank)
    try:
        worker(DistInfo(local_rank, local_rank, world_size), *args)
    finally:
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (the only process that writes files)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_mean(value: float, device: torch.device | str = "cpu") -> float:
    """Mean of a float over all processes (identity without a process group)."""
    if not _initialized() or dist.get_world_size() == 1:
        return float(value)
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()
