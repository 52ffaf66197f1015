"""Sharded Ships, Sahara and head search: one sweep shared by several processes, GPUs or machines.

This is the layer above the methods that drives them across processes; the shard primitives they
call (:class:`WorkShard`, :class:`StaticShard`, :class:`DistributedShard`, :func:`partition`, the
cost models and checkpoint files) live below them in :mod:`safetyheads.shards` and are re-exported
here.

The work of a sweep is cut into *units* that are computed exactly as a single-process run computes
them, so a sharded result is bit-identical to the single-process one (same hardware, same
software, same CPU thread count; see "Numerics" below):

* Ships: a unit is one prompt × one batch of heads — one forward pass of
  :func:`safetyheads.ships` (batch ``batch_size``, residual reused below the batch's lowest
  layer). A process recomputes the cheap unablated forward of each prompt it has units of.
* Sahara and :func:`~safetyheads.search.search_heads`: a unit is one candidate head of one
  greedy step (its score over all prompts). After
  each step every process holds every candidate's score and applies the same argmax and
  tie-break, so all processes choose the same head.

Units are assigned by :func:`partition`: contiguous runs in a fixed order, balanced by an
estimated cost (layers that actually run × rows × tokens), the same on every process. Scores are
exchanged with ``all_gather_object`` on a gloo group created for the purpose (so it works under
NCCL too, and with a long timeout: processes wait for the slowest one), and every process
returns the full result.

Checkpoints: with ``checkpoint_dir``, each process writes the units it finished to its own file
``<dir>/<work digest>.rank<r>.json`` (atomically, every ``checkpoint_every_s`` and at the end of
each phase). A rerun reads every such file it can see (a shared file system shows them all; a
local one shows the process's own), all processes exchange what they found, and only the
missing units are shared out again — the work of a lost process is redone, nothing else. The
work digest covers the model, the tokenized prompts, the heads, the batch size and the ablation,
so files of another configuration are never used. For a greedy search, finished steps are replayed from
their files (no forward pass) and the search resumes at the first unfinished step.

Usage (``torchrun --nproc_per_node 4 script.py``)::

    from safetyheads.distributed import init_distributed, ships_distributed, sahara_distributed
    rank, world, device = init_distributed()          # torchrun / accelerate launch env
    model, tok = load_model(name, device=str(device), dtype="bfloat16")
    res = ships_distributed(model, tok, prompts, checkpoint_dir="ckpt")   # full result on every rank
    if rank == 0:
        res.save("ships")

Without a launcher (``torch.distributed`` not initialised) these functions run everything in
the one process, with the same checkpoints. A static split needs no communication at all:
``ships(..., shard=(rank, world))`` in independent jobs, then :func:`merge_ships`.

Numerics: every unit runs the same kernels on the same shapes wherever it runs, so results are
bit-identical across processes of one machine type. Across different GPU models, driver or
library versions, or CPU thread counts, kernels may round differently: expect differences at the
rounding level of the model's dtype (~1e-3 relative for bf16 logits, far below the spread of the
scores), which can swap near-tied heads.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .sahara import SaharaResult, sahara
from .search import SearchResult, search_heads
from .shards import (
    DEFAULT_TIMEOUT,
    DistributedShard,
    StaticShard,
    WorkShard,
    as_shard,
    candidate_cost,
    partition,
    unit_cost,
)
from .ships import ShipsResult, ships

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedShard",
    "StaticShard",
    "WorkShard",
    "as_shard",
    "candidate_cost",
    "init_distributed",
    "merge_ships",
    "partition",
    "replica_devices",
    "replica_max_memory",
    "sahara_distributed",
    "search_distributed",
    "ships_distributed",
    "unit_cost",
]

# --------------------------------------------------------------------------- entry points


def init_distributed(backend: str | None = None, *,
                     timeout: _dt.timedelta | None = None) -> tuple[int, int, torch.device]:
    """Initialise ``torch.distributed`` from a launcher's environment; returns ``(rank, world, device)``.

    Under ``torchrun`` / ``accelerate launch`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` set) the
    default group is created with ``backend`` (default: NCCL with CUDA, else gloo) and, with CUDA,
    the current device becomes ``cuda:LOCAL_RANK``. Without a launcher: ``(0, 1, device)`` and
    nothing is initialised. Safe to call when already initialised.
    """
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return 0, 1, device
        kwargs: dict[str, Any] = {"backend": backend or ("nccl" if cuda else "gloo")}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if cuda and kwargs["backend"] == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def replica_devices(gpus_per_replica: int, local_rank: int | None = None) -> list[int]:
    """The CUDA device indices of this process's model replica when each spans ``gpus_per_replica``
    GPUs of the machine: local rank r gets ``[r*g, …, r*g + g - 1]``."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    n = torch.cuda.device_count()
    devs = list(range(local_rank * gpus_per_replica, (local_rank + 1) * gpus_per_replica))
    if gpus_per_replica < 1 or devs[-1] >= n:
        raise RuntimeError(f"local rank {local_rank} with {gpus_per_replica} GPUs per replica needs GPUs {devs}, "
                           f"but {n} are visible: use --nproc_per_node {max(1, n // max(gpus_per_replica, 1))}")
    return devs


def replica_max_memory(gpus_per_replica: int, *, fraction: float = 0.9,
                       local_rank: int | None = None) -> dict[int, int]:
    """``max_memory`` for ``load_model(..., device_map="auto", max_memory=...)`` that places this
    process's replica on its own GPUs only (:func:`replica_devices`), each filled to ``fraction``."""
    return {i: int(torch.cuda.get_device_properties(i).total_memory * fraction)
            for i in replica_devices(gpus_per_replica, local_rank)}


def ships_distributed(model, tokenizer, prompts: Sequence[str], *, group: Any = None,
                      checkpoint_dir: str | Path | None = None, checkpoint_every_s: float = 60.0,
                      timeout: _dt.timedelta = DEFAULT_TIMEOUT, progress: bool | None = None,
                      **kwargs: Any) -> ShipsResult:
    """:func:`safetyheads.ships` shared between the processes of ``group``; the full result on every one.

    Call it on every process with the same arguments. ``kwargs`` are those of ``ships`` (mode, eps,
    prompt_format, heads, batch_size, refusal_tokens, method, mean, …); ``progress`` defaults to
    rank 0 only. See the module docs for checkpoints.
    """
    shard = DistributedShard(group, checkpoint_dir=checkpoint_dir, checkpoint_every_s=checkpoint_every_s,
                             timeout=timeout)
    if progress is None:
        progress = shard.rank == 0
    return ships(model, tokenizer, prompts, shard=shard, progress=progress, **kwargs)


def sahara_distributed(model, tokenizer, prompts: Sequence[str], *, group: Any = None,
                       checkpoint_dir: str | Path | None = None, checkpoint_every_s: float = 60.0,
                       timeout: _dt.timedelta = DEFAULT_TIMEOUT, progress: bool | None = None,
                       **kwargs: Any) -> SaharaResult:
    """:func:`safetyheads.sahara` with every step's candidates shared between the processes of ``group``.

    Every process returns the same :class:`~safetyheads.sahara.SaharaResult`. ``kwargs`` are those
    of ``sahara`` except ``checkpoint`` (use ``checkpoint_dir``: finished steps are replayed from it).
    """
    if "checkpoint" in kwargs:
        raise ValueError("sahara_distributed keeps per-process checkpoints: pass checkpoint_dir=, not checkpoint=")
    shard = DistributedShard(group, checkpoint_dir=checkpoint_dir, checkpoint_every_s=checkpoint_every_s,
                             timeout=timeout)
    if progress is None:
        progress = shard.rank == 0
    return sahara(model, tokenizer, prompts, shard=shard, progress=progress, **kwargs)


def search_distributed(model, tokenizer, prompts: Sequence[str], *, group: Any = None,
                       checkpoint_dir: str | Path | None = None, checkpoint_every_s: float = 60.0,
                       timeout: _dt.timedelta = DEFAULT_TIMEOUT, progress: bool | None = None,
                       **kwargs: Any) -> SearchResult:
    """:func:`safetyheads.search.search_heads` with every step's candidates shared between the processes
    of ``group``; every process returns the same result. ``kwargs`` are those of ``search_heads``
    except ``checkpoint`` (use ``checkpoint_dir``)."""
    if "checkpoint" in kwargs:
        raise ValueError("search_distributed keeps per-process checkpoints: pass checkpoint_dir=, not checkpoint=")
    shard = DistributedShard(group, checkpoint_dir=checkpoint_dir, checkpoint_every_s=checkpoint_every_s,
                             timeout=timeout)
    if progress is None:
        progress = shard.rank == 0
    return search_heads(model, tokenizer, prompts, shard=shard, progress=progress, **kwargs)


def merge_ships(parts: Sequence[ShipsResult]) -> ShipsResult:
    """Combine :class:`~safetyheads.ships.ShipsResult` parts of one sweep (e.g. static shards).

    Every part must cover the same prompts and method; a head scored in several parts must have
    the same score in each. Heads scored in no part stay NaN.
    """
    if not parts:
        raise ValueError("no parts to merge")
    first = parts[0]
    kl = first.kl.clone()
    refusal = None if first.refusal is None else first.refusal.clone()
    for p in parts[1:]:
        if p.prompts != first.prompts or p.method != first.method or p.kl.shape != first.kl.shape:
            raise ValueError("the parts are not of the same sweep (prompts, method or shape differ)")
        if (p.refusal is None) != (refusal is None):
            raise ValueError("some parts have refusal scores and some do not")
        for mine, theirs in ((kl, p.kl), (refusal, p.refusal)):
            if mine is None:
                continue
            both = ~mine.isnan() & ~theirs.isnan()
            if not torch.equal(mine[both], theirs[both]):
                raise ValueError("the parts disagree on a head they both scored")
            fill = mine.isnan() & ~theirs.isnan()
            mine[fill] = theirs[fill]
    prov = dict(first.provenance)
    prov["shard"] = {"kind": "merged", "parts": len(parts)}
    return ShipsResult(kl, refusal, list(first.prompts), first.method, prov)
