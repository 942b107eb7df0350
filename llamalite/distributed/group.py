"""The group of ranks torchrun starts: this rank's place (Shard, from_env, rank_device), agreement across
ranks (check_same, agree), the control group and the leader that drives the followers' steps (Leader,
follow), and the time spent in collectives (Collectives)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn


class ParallelError(ValueError):
    """A model or setting that cannot be split as asked, with what to do instead."""


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group: rank `rank` of `world`."""
    rank: int
    world: int


def even(units: int, world: int) -> list[tuple[int, int]]:
    """`units` split into `world` contiguous ranges as evenly as possible, the larger ones first."""
    base, extra = divmod(units, world)
    out, start = [], 0
    for r in range(world):
        n = base + (r < extra)
        out.append((start, start + n))
        start += n
    return out


class Collectives:
    """Seconds this process has spent in the split's collectives and hand-overs, waiting for the other
    ranks included: what benchmarks report as the communication share of a step. Python's collectives
    add to `seconds`; the kernels' all-reduces (a Reducer's) count their own."""
    seconds = 0.0
    reducers: list = []
    _start = 0.0

    @classmethod
    def reset(cls) -> None:
        """Count from now (the kernels' counters run on: their reading now is taken off)."""
        cls.seconds, cls._start = 0.0, sum(r.seconds() for r in cls.reducers)

    @classmethod
    def since_reset(cls) -> float:
        return cls.seconds + sum(r.seconds() for r in cls.reducers) - cls._start


def from_env(timeout_s: float = 300.0) -> Shard | None:
    """This process's shard when torchrun started it with more than one process (WORLD_SIZE > 1): the
    default process group is set up (gloo on CPUs, with a timeout so that a rank that never arrives is
    an error, not a hang). None in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo between CPUs; NCCL between GPUs where there are any (each rank then on cuda:LOCAL_RANK)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001 (a rendezvous that fails says where it tried)
            raise ParallelError(f"rank {os.environ.get('RANK')} of {world} could not join the group at "
                                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({e}); check that "
                                "every machine runs the same torchrun command with a reachable --rdzv-endpoint") from e
    return Shard(dist.get_rank(), dist.get_world_size())


def rank_device(device: str) -> str:
    """A rank's device: plain "cuda" means this rank's own GPU (torchrun's LOCAL_RANK) when split."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def check_same(what: dict[str, Any]) -> None:
    """Refuse to go on when the ranks loaded different models (each machine reads its own copy of the
    file): `what` is this rank's description of it, compared with rank 0's."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, what)
    for rank, other in enumerate(everyone):
        if other != everyone[0]:
            differ = sorted(k for k in everyone[0] if other.get(k) != everyone[0].get(k))
            raise ParallelError(f"rank {rank} loaded a different model file than rank 0 (they differ in "
                                f"{', '.join(differ)}: {other} against {everyone[0]}); every machine needs the "
                                "same GGUF file")


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (a prompt read from stdin, a random seed): what all ranks must share."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def control_group() -> Any:
    """The group over which rank 0 hands its calls to the others (`Leader`, `follow`): no timeout worth the
    name, since a follower waits there as long as the server is idle (torchrun stops the others when one
    rank exits)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(days=365))


def _why(e: BaseException) -> str:
    """The gist of a collective's error: its first sentence, without gloo's source location."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])
    return text.split(". ")[0].rstrip(".") or type(e).__name__


class Leader:
    """Rank 0's model in a tensor-parallel server: every call the engine makes on it (a forward, the
    hidden states, setting up the caches) is first handed to the other ranks, which make the same call
    on their parts of the model (`follow`), so that the collectives inside meet. Sampling and everything
    else happen on rank 0 alone: every rank ends a forward with the same logits.

    A call that fails leaves the ranks out of step (or one of them gone), so the split cannot go on: the
    Leader says why (`broken`), calls `on_broken` (the server stops) and refuses every later call."""

    def __init__(self, model: nn.Module, group: Any, on_broken: Any = None):
        self.model, self.group, self.on_broken = model, group, on_broken
        self.broken: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def _hand(self, op: str, args: tuple, kwargs: dict) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([(op, args, kwargs)], src=0, group=self.group)

    def _call(self, op: str, call: Any, args: tuple, kwargs: dict) -> Any:
        if self.broken is not None:
            raise ParallelError(self.broken)
        try:
            self._hand(op, args, kwargs)
            return call(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (any failure leaves the ranks out of step)
            import torch.distributed as dist

            self.broken = (f"the model split over {dist.get_world_size()} ranks cannot go on: {_why(e)} (a rank "
                           "has exited or fallen out of step: see the other ranks' output); restart the whole group")
            if self.on_broken is not None:
                self.on_broken()
            raise ParallelError(self.broken) from e

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._call("forward", self.model, args, kwargs)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._call("hidden", self.model.hidden, (tokens,), {})

    def setup_caches(self, *args: Any, **kwargs: Any) -> None:
        self._call("setup_caches", self.model.setup_caches, args, kwargs)

    def shift_caches(self, *args: Any, **kwargs: Any) -> None:
        self._call("shift_caches", self.model.shift_caches, args, kwargs)

    def close(self) -> None:
        """Let the followers go (the server is stopping); nothing to say to a group already broken."""
        if self.broken is None:
            try:
                self._hand("stop", (), {})
            except Exception:  # noqa: BLE001 (the others are gone already: torchrun stopped them)
                pass


def follow(model: nn.Module, group: Any) -> None:
    """A rank other than 0 of a tensor-parallel server: make each call rank 0's Leader hands over, on this
    rank's part of the model, until it says stop. Rank 0 gone, or a call that fails, ends it with an
    error (the split cannot go on)."""
    import torch.distributed as dist

    calls = {"forward": model, "hidden": model.hidden, "setup_caches": model.setup_caches,
             "shift_caches": model.shift_caches}
    while True:
        box: list = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=group)
            op, args, kwargs = box[0]
            if op == "stop":
                return
            with torch.inference_mode():
                calls[op](*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ParallelError(f"rank {dist.get_rank()} of the split server stops: {_why(e)} (rank 0, which serves, "
                                "has exited or fallen out of step: see its output)") from e
