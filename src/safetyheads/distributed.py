"""Sharded Ships and Sahara: one sweep shared by several processes, GPUs or machines.

The work of a sweep is cut into *units* that are computed exactly as a single-process run computes
them, so a sharded result is bit-identical to the single-process one (same hardware, same
software, same CPU thread count; see "Numerics" below):

* Ships: a unit is one prompt × one batch of heads — one forward pass of
  :func:`safetyheads.ships` (batch ``batch_size``, residual reused below the batch's lowest
  layer). A process recomputes the cheap unablated forward of each prompt it has units of.
* Sahara: a unit is one candidate head of one greedy step (its score over all prompts). After
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
so files of another configuration are never used. For Sahara, finished steps are replayed from
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
import hashlib
import json
import logging
import os
import time
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .ablation import Head
from .provenance import atomic_write_text

log = logging.getLogger("safetyheads")

__all__ = [
    "DistributedShard",
    "StaticShard",
    "WorkShard",
    "candidate_cost",
    "init_distributed",
    "merge_ships",
    "partition",
    "replica_devices",
    "replica_max_memory",
    "sahara_distributed",
    "ships_distributed",
    "unit_cost",
]

#: how long a process waits for the others at a gather (the slowest share of a sweep)
DEFAULT_TIMEOUT = _dt.timedelta(hours=48)


# --------------------------------------------------------------------------- the shard protocol


@runtime_checkable
class WorkShard(Protocol):
    """What :func:`~safetyheads.ships` and :func:`~safetyheads.sahara` call when given ``shard=``.

    A phase is one ``select`` → ``record``\\ * → ``gather``, called in the same order on every
    process: ``select(key, units)`` gets the JSON-able description of the work (``key``) and every
    ``(unit, cost)`` still to do, and returns the units this process computes; ``record`` receives
    each finished unit's value (JSON-able); ``gather`` returns ``{unit: value}`` for all units
    known (everything, for a shard that communicates).
    """

    #: whether ``gather`` returns every unit (needed by Sahara, whose steps depend on each other)
    complete: bool

    def select(self, key: dict, units: Sequence[tuple[Hashable, float]]) -> Iterable[Hashable]: ...

    def record(self, unit: Hashable, value: Any) -> None: ...

    def gather(self) -> dict[Hashable, Any]: ...

    def describe(self) -> dict: ...


def as_shard(shard: Any, *, need_all: bool = False) -> WorkShard:
    """Accept a :class:`WorkShard` or a ``(rank, world)`` pair (a :class:`StaticShard`)."""
    if isinstance(shard, tuple) and len(shard) == 2 and all(isinstance(x, int) for x in shard):
        shard = StaticShard(*shard)
    if not isinstance(shard, WorkShard):
        raise TypeError(f"shard must be a (rank, world) pair or a WorkShard (e.g. DistributedShard()), got {shard!r}")
    if need_all and not shard.complete:
        raise ValueError("Sahara's steps depend on every candidate's score: a static (rank, world) shard cannot run "
                         "it; use DistributedShard() under torchrun (sahara_distributed)")
    return shard


# --------------------------------------------------------------------------- partition and costs


def unit_cost(n_tokens: int, heads: Sequence[Head], n_layers: int, method: str = "exact") -> float:
    """Estimated cost of one Ships unit: rows × tokens × layers that run (the residual is reused
    below the lowest ablated layer; ``naive`` runs every layer), plus a small per-pass overhead."""
    if method == "naive":
        return float(n_tokens * (n_layers + 1))
    low = min(layer for layer, _ in heads)
    return float(len(heads) * n_tokens * (n_layers - low) + n_tokens)


def candidate_cost(heads: Sequence[Head], n_layers: int) -> float:
    """Estimated cost of scoring one Sahara ablation: the layers that run (from its lowest layer)."""
    return float(n_layers - min(layer for layer, _ in heads) + 1)


def partition(costs: Sequence[float], world: int) -> list[int]:
    """Owner (0..world-1) of each item: contiguous runs of about equal total cost, in item order.

    Item ``i`` goes to the process whose equal share of the cumulative cost contains the item's
    midpoint — deterministic, so every process computes the same assignment.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    total = float(sum(costs))
    if total <= 0:
        return [i % world for i in range(len(costs))]
    owners, acc = [], 0.0
    for c in costs:
        owners.append(min(world - 1, int((acc + c / 2) * world / total)))
        acc += c
    return owners


# --------------------------------------------------------------------------- checkpoint files


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, tuple) else x


class _Files:
    """Per-process unit files of one phase in ``directory``."""

    def __init__(self, directory: str | Path | None, rank: int) -> None:
        self.dir = Path(directory) if directory is not None else None
        self.rank = rank

    def path(self, digest: str, rank: int | None = None) -> Path:
        assert self.dir is not None
        return self.dir / f"{digest}.rank{self.rank if rank is None else rank}.json"

    def load(self, digest: str) -> tuple[dict, dict]:
        """``(own, all)``: units in this process's file, and in every file of the digest."""
        own: dict = {}
        every: dict = {}
        if self.dir is None or not self.dir.exists():
            return own, every
        mine = self.path(digest)
        for f in sorted(self.dir.glob(f"{digest}.rank*.json")):
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError) as e:  # a torn or foreign file: ignore it, the work is redone
                log.warning("ignoring unreadable checkpoint %s: %s", f, e)
                continue
            if data.get("digest") != digest:
                continue
            units = {_tuplify(u): _tuplify_value(v) for u, v in data["units"]}
            every.update(units)
            if f == mine:
                own.update(units)
        return own, every

    def save(self, digest: str, key: dict, units: dict) -> None:
        if self.dir is None:
            return
        body = {"digest": digest, "rank": self.rank, "key": key,
                "units": [[_listify(u), _listify(v)] for u, v in units.items()]}
        atomic_write_text(self.path(digest), json.dumps(body))


def _tuplify_value(v: Any) -> Any:
    # Ships values are (kl list, refusal list | None); Sahara values are floats
    return tuple(v) if isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) else v


class _Phase:
    """Bookkeeping shared by the shards: key, units, loaded and new values, periodic saving."""

    def __init__(self, files: _Files, every_s: float) -> None:
        self.files = files
        self.every_s = every_s
        self.key: dict = {}
        self.digest = ""
        self.units: list[Hashable] = []
        self.own: dict = {}
        self.known: dict = {}
        self.new: dict = {}
        self.last_save = time.monotonic()
        self.computed_total = 0  # units computed by this process, all phases (for tests and reports)

    def start(self, key: dict, units: Sequence[tuple[Hashable, float]]) -> None:
        self.key, self.digest = key, _digest(key)
        self.units = [u for u, _ in units]
        self.own, self.known = self.files.load(self.digest)
        wanted = set(self.units)
        self.known = {u: v for u, v in self.known.items() if u in wanted}
        self.new = {}
        self.last_save = time.monotonic()

    def record(self, unit: Hashable, value: Any) -> None:
        self.new[unit] = value
        self.computed_total += 1
        if time.monotonic() - self.last_save >= self.every_s:
            self.save()

    def save(self) -> None:
        if self.new or self.own:
            self.files.save(self.digest, self.key, {**self.own, **self.new})
        self.last_save = time.monotonic()


# --------------------------------------------------------------------------- shards


class StaticShard:
    """Share ``rank`` of ``world`` of the units, without any communication.

    The split is over all units (so it does not depend on what other jobs have finished); units
    found in ``checkpoint_dir`` are skipped. ``gather`` returns only what this process knows: the
    result has NaN for the other shares — combine the parts with :func:`merge_ships`. Ships only.
    """

    complete = False

    def __init__(self, rank: int, world: int, *, checkpoint_dir: str | Path | None = None,
                 checkpoint_every_s: float = 60.0) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.rank, self.world = rank, world
        self._phase = _Phase(_Files(checkpoint_dir, rank), checkpoint_every_s)

    @property
    def computed(self) -> int:
        """Units this process computed (not loaded) so far."""
        return self._phase.computed_total

    def select(self, key: dict, units: Sequence[tuple[Hashable, float]]) -> list[Hashable]:
        self._phase.start(key, units)
        owners = partition([c for _, c in units], self.world)
        return [u for (u, _), o in zip(units, owners) if o == self.rank and u not in self._phase.known]

    def record(self, unit: Hashable, value: Any) -> None:
        self._phase.record(unit, value)

    def gather(self) -> dict[Hashable, Any]:
        self._phase.save()
        return {**self._phase.known, **self._phase.new}

    def describe(self) -> dict:
        return {"kind": "static", "rank": self.rank, "world": self.world}


_OBJECT_GROUPS: dict[tuple, Any] = {}


def _object_group(group: Any, timeout: _dt.timedelta) -> Any:
    """A gloo group with the ranks of ``group`` (for Python-object collectives), made once per group."""
    import torch.distributed as dist

    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else None
    key = (ranks, timeout)
    if key not in _OBJECT_GROUPS:
        _OBJECT_GROUPS[key] = dist.new_group(ranks=list(ranks) if ranks else None, backend="gloo", timeout=timeout)
    return _OBJECT_GROUPS[key]


class DistributedShard:
    """Share the work between the processes of a ``torch.distributed`` group; every process gets all.

    Construct it on every process of ``group`` (default: the whole world), in the same order: it
    creates a gloo group for the exchanges (with ``timeout``, the longest a process waits for the
    others). If ``torch.distributed`` is not initialised it runs everything in this process.

    Args:
        group: the process group (None: the default group).
        checkpoint_dir: where each process keeps the units it finished (see the module docs);
            shared by all processes or local to each machine. None: no checkpoints.
        checkpoint_every_s: how often a process rewrites its file during a phase (and always at
            the end of one). 0: after every unit.
        timeout: how long a gather waits for the slowest process.
    """

    complete = True

    def __init__(self, group: Any = None, *, checkpoint_dir: str | Path | None = None,
                 checkpoint_every_s: float = 60.0, timeout: _dt.timedelta = DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        self.active = dist.is_available() and dist.is_initialized()
        if self.active:
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            self._group = _object_group(group, timeout) if self.world > 1 else None
        else:
            self.rank, self.world, self._group = 0, 1, None
        self._phase = _Phase(_Files(checkpoint_dir, self.rank), checkpoint_every_s)
        self.loaded = 0  # units of the last phase that came from checkpoint files

    @property
    def computed(self) -> int:
        """Units this process computed (not loaded) so far, over all phases."""
        return self._phase.computed_total

    def _all_gather(self, obj: Any) -> list[Any]:
        if self._group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def select(self, key: dict, units: Sequence[tuple[Hashable, float]]) -> list[Hashable]:
        ph = self._phase
        ph.start(key, units)
        views = self._all_gather((ph.digest, ph.known))
        digests = {d for d, _ in views}
        if len(digests) != 1:
            raise RuntimeError(
                f"the processes disagree on the work ({len(digests)} different work digests: {sorted(digests)}); "
                "every process must call with the same model, prompts, heads and options"
            )
        known: dict = {}
        for _, k in views:
            known.update(k)
        ph.known = known
        self.loaded = len(known)
        todo = [(u, c) for u, c in units if u not in known]
        owners = partition([c for _, c in todo], self.world)
        return [u for (u, _), o in zip(todo, owners) if o == self.rank]

    def record(self, unit: Hashable, value: Any) -> None:
        self._phase.record(unit, value)

    def gather(self) -> dict[Hashable, Any]:
        ph = self._phase
        ph.save()
        out = dict(ph.known)
        for part in self._all_gather(ph.new):
            out.update(part)
        missing = [u for u in ph.units if u not in out]
        if missing:
            raise RuntimeError(f"{len(missing)} work units were computed by no process (first: {missing[:3]})")
        return out

    def describe(self) -> dict:
        return {"kind": "distributed", "world": self.world, "loaded_from_checkpoints": self.loaded}


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
                      timeout: _dt.timedelta = DEFAULT_TIMEOUT, progress: bool | None = None, **kwargs: Any):
    """:func:`safetyheads.ships` shared between the processes of ``group``; the full result on every one.

    Call it on every process with the same arguments. ``kwargs`` are those of ``ships`` (mode, eps,
    prompt_format, heads, batch_size, refusal_tokens, method, mean, …); ``progress`` defaults to
    rank 0 only. See the module docs for checkpoints.
    """
    from .ships import ships

    shard = DistributedShard(group, checkpoint_dir=checkpoint_dir, checkpoint_every_s=checkpoint_every_s,
                             timeout=timeout)
    if progress is None:
        progress = shard.rank == 0
    return ships(model, tokenizer, prompts, shard=shard, progress=progress, **kwargs)


def sahara_distributed(model, tokenizer, prompts: Sequence[str], *, group: Any = None,
                       checkpoint_dir: str | Path | None = None, checkpoint_every_s: float = 60.0,
                       timeout: _dt.timedelta = DEFAULT_TIMEOUT, progress: bool | None = None, **kwargs: Any):
    """:func:`safetyheads.sahara` with every step's candidates shared between the processes of ``group``.

    Every process returns the same :class:`~safetyheads.sahara.SaharaResult`. ``kwargs`` are those
    of ``sahara`` except ``checkpoint`` (use ``checkpoint_dir``: finished steps are replayed from it).
    """
    from .sahara import sahara

    if "checkpoint" in kwargs:
        raise ValueError("sahara_distributed keeps per-process checkpoints: pass checkpoint_dir=, not checkpoint=")
    shard = DistributedShard(group, checkpoint_dir=checkpoint_dir, checkpoint_every_s=checkpoint_every_s,
                             timeout=timeout)
    if progress is None:
        progress = shard.rank == 0
    return sahara(model, tokenizer, prompts, shard=shard, progress=progress, **kwargs)


def merge_ships(parts: Sequence[Any]):
    """Combine :class:`~safetyheads.ships.ShipsResult` parts of one sweep (e.g. static shards).

    Every part must cover the same prompts and method; a head scored in several parts must have
    the same score in each. Heads scored in no part stay NaN.
    """
    from .ships import ShipsResult

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
