"""Shares of a sweep's work: the primitives that Ships, Sahara and the head search call when given ``shard=``.

The work of a sweep is cut into *units* that are computed exactly as a single-process run computes
them, so a sharded result is bit-identical to the single-process one (same hardware, same
software, same CPU thread count; see "Numerics" in :mod:`safetyheads.distributed`):

* Ships: a unit is one prompt × one batch of heads — one forward pass of
  :func:`safetyheads.ships` (batch ``batch_size``, residual reused below the batch's lowest
  layer). A process recomputes the cheap unablated forward of each prompt it has units of.
* Greedy search (:func:`safetyheads.search.search_heads`, Sahara): a unit is one candidate head of
  one greedy step (its score over all prompts). After each step every process holds every
  candidate's score and applies the same argmax and tie-break, so all processes choose the same head.

Units are assigned by :func:`partition`: contiguous runs in a fixed order, balanced by an
estimated cost (:func:`unit_cost`, :func:`candidate_cost`), the same on every process.
:class:`StaticShard` splits without communication; :class:`DistributedShard` exchanges scores with
``all_gather_object`` on a gloo group created for the purpose (so it works under NCCL too, and with
a long timeout: processes wait for the slowest one), and every process gets the full result.

Checkpoints: with ``checkpoint_dir``, each process writes the units it finished to its own file
``<dir>/<work digest>.rank<r>.json`` (atomically, every ``checkpoint_every_s`` and at the end of
each phase). A rerun reads every such file it can see, all processes exchange what they found, and
only the missing units are shared out again. The work digest covers everything that fixes what a
unit computes, so files of another configuration are never used.

This module sits below the methods (ships, search, sahara import it); what drives them across
processes (:func:`~safetyheads.distributed.init_distributed`, ``ships_distributed``,
``sahara_distributed``, ``merge_ships`` …) is :mod:`safetyheads.distributed`, above them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .ablation import Head
from .provenance import atomic_write_text

log = logging.getLogger("safetyheads")

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedShard",
    "StaticShard",
    "WorkShard",
    "as_shard",
    "candidate_cost",
    "partition",
    "unit_cost",
]

#: how long a process waits for the others at a gather (the slowest share of a sweep)
DEFAULT_TIMEOUT = _dt.timedelta(hours=48)


# --------------------------------------------------------------------------- the shard protocol


@runtime_checkable
class WorkShard(Protocol):
    """What :func:`~safetyheads.ships`, :func:`~safetyheads.search.search_heads` and
    :func:`~safetyheads.sahara` call when given ``shard=``.

    A phase is one ``select`` → ``record``\\ * → ``gather``, called in the same order on every
    process: ``select(key, units)`` gets the JSON-able description of the work (``key``) and every
    ``(unit, cost)`` still to do, and returns the units this process computes; ``record`` receives
    each finished unit's value (JSON-able); ``gather`` returns ``{unit: value}`` for all units
    known (everything, for a shard that communicates).
    """

    #: whether ``gather`` returns every unit (needed by a greedy search, whose steps depend on each other)
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
        raise ValueError("a greedy search's steps (Sahara, search_heads) depend on every candidate's score: a static "
                         "(rank, world) shard cannot run it; use DistributedShard() under torchrun (sahara_distributed)")
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
    """Estimated cost of scoring one candidate group of a greedy search: the layers that run (from its lowest layer)."""
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
    # Ships values are (kl list, refusal list | None); search values are floats or [score, harmless KL]
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
