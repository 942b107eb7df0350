"""Tensor parallelism for inference (Megatron-LM, Shoeybi et al. 2019) over torch.distributed: a model
too big for one machine split across N processes (ranks) launched by torchrun, on one or several
machines, gloo between CPUs and NCCL between GPUs.

Each rank holds whole key/value-head groups of every attention layer (so grouped-query attention
stays intact) and a slice of every feed-forward: wq, wk, wv, w1 and w3 split by output rows (their
"columns" in Megatron's terms), wo and w2 by input columns, so that each rank's wo and w2 give a
partial sum of the block's output and one all-reduce after each completes it. Norms, RoPE and the KV
cache are local to the rank's heads; the embedding and the output layer are replicated, so every rank
ends a step with the same logits. Each rank reads only its own slices from the GGUF memory map
(quantized rows split on whole rows and whole blocks), so it holds about 1/N of the layers' weights.

Heads are dealt out as evenly as whole groups allow (SmolLM2-135M's 3 groups go 2 + 1 over two ranks);
feed-forward rows as evenly as whole blocks of w2's type allow.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.config import ModelConfig
from .group import Collectives, ParallelError, Shard, agree, even


@dataclass(frozen=True)
class Split:
    """What rank `shard.rank` holds of a model with config `cfg`: row ranges of wq/wk/wv (and of their
    biases) and w1/w3, the same ranges as input columns of wo and w2, and its local config (its heads and
    hidden width); per-head norms (Qwen3's) are whole on every rank.
    `w2_block` and `wo_block` are the elements per quantization block along those weights' rows."""
    cfg: ModelConfig
    shard: Shard
    w2_block: int = 1
    wo_block: int = 1

    def __post_init__(self):
        cfg, world = self.cfg, self.shard.world
        if cfg.n_experts:
            raise ParallelError(f"a mixture of experts ({cfg.n_experts} experts) is not split by heads yet: split it "
                                f"by layers (--pp), or run it in one process")
        if world > cfg.n_kv_heads:
            raise ParallelError(f"tensor parallelism over {world} ranks needs at least {world} key/value-head groups; "
                                f"this model has {cfg.n_kv_heads}: use at most {cfg.n_kv_heads} ranks")
        rep, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
        for lo, hi in even(cfg.n_kv_heads, world):
            if (lo * rep * hd) % self.wo_block or (hi * rep * hd) % self.wo_block:
                raise ParallelError(f"wo's blocks of {self.wo_block} columns do not split on this model's head "
                                    f"boundaries ({rep} x {hd} columns a group) for {world} ranks; try another "
                                    f"--tp, or a file whose wo is in a type of 32-wide blocks (Q4_0, Q4_1, Q8_0)")
        if cfg.hidden_dim % self.w2_block or cfg.hidden_dim // self.w2_block < world:
            raise ParallelError(f"the feed-forward's {cfg.hidden_dim} columns of w2 in blocks of {self.w2_block} do "
                                f"not split over {world} ranks")

    @property
    def heads(self) -> tuple[int, int]:
        """This rank's key/value-head groups, [lo, hi)."""
        return even(self.cfg.n_kv_heads, self.shard.world)[self.shard.rank]

    @property
    def hidden(self) -> tuple[int, int]:
        """This rank's feed-forward rows of w1/w3 (columns of w2), [lo, hi), on whole w2 blocks."""
        lo, hi = even(self.cfg.hidden_dim // self.w2_block, self.shard.world)[self.shard.rank]
        return lo * self.w2_block, hi * self.w2_block

    def local_config(self) -> ModelConfig:
        lo, hi = self.heads
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        h_lo, h_hi = self.hidden
        return dataclasses.replace(self.cfg, n_heads=(hi - lo) * rep, n_kv_heads=hi - lo, hidden_dim=h_hi - h_lo,
                                   head_dim=self.cfg.head_dim)

    def rename(self, name: str) -> str | None:
        """Every weight is in every rank's part (cut by `ranges`), under its own name."""
        return name

    def ranges(self, name: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """(rows, columns) this rank keeps of Meta-named weight `name` (None: all of them)."""
        lo, hi = self.heads
        hd, rep = self.cfg.head_dim, self.cfg.n_heads // self.cfg.n_kv_heads
        q, kv = (lo * rep * hd, hi * rep * hd), (lo * hd, hi * hd)
        target = name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]  # a bias: its rows
        return {"wq": (q, None), "wk": (kv, None), "wv": (kv, None), "wo": (None, q), "w1": (self.hidden, None),
                "w3": (self.hidden, None), "w2": (None, self.hidden)}.get(target, (None, None))


def _this_host() -> tuple:
    """What tells whether two ranks can share memory: the same boot of the same machine, seen from the
    same mount, network and process namespaces (containers, or test "hosts" in namespaces, count as
    machines of their own)."""
    import socket

    def read(path: str) -> str:
        try:
            return open(path).read().strip()
        except OSError:
            return ""

    def inode(path: str) -> int:
        try:
            return os.stat(path).st_ino
        except OSError:
            return 0
    return (socket.gethostname(), read("/proc/sys/kernel/random/boot_id"),
            *(inode(f"/proc/self/ns/{ns}") for ns in ("mnt", "net", "pid", "ipc")))


def reducer(dim: int, timeout_s: float = 300.0, group: Any = None) -> Any:
    """The kernels' all-reduce for this rank's group (llamalite.Reducer): through a shared-memory region
    when every rank runs on this machine (microseconds a call), else through the process group's own
    all-reduce (gloo: a network round trip), called from C++ in both cases. LLAMALITE_TP_REDUCE=group
    forces the second (to measure one against the other). None without the kernels."""
    import mmap
    import tempfile
    import uuid

    import torch.distributed as dist

    from ..kernels.ops import kernels_available

    if not kernels_available():
        return None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    made = torch.classes.llamalite.Reducer(rank, world, float(timeout_s))
    hosts: list = [None] * world
    dist.all_gather_object(hosts, _this_host(), group=group)
    forced = agree(os.environ.get("LLAMALITE_TP_REDUCE", "auto") == "group")  # rank 0's say: all ranks alike
    shared = all(h == hosts[0] for h in hosts) and not forced
    if shared:
        capacity = max(dim * 64, 1 << 18)  # floats a rank's slot holds: larger sums go in pieces
        size = torch.classes.llamalite.Reducer.region_bytes(world, capacity)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = agree(os.path.join(folder, f"llamalite-tp-{uuid.uuid4().hex}") if rank == 0 else None)
        region = None
        if rank == 0:
            try:
                with open(path, "wb") as f:
                    f.truncate(size)
            except OSError:
                pass  # the others then find no file: everyone goes through the process group
        dist.barrier(group=group)  # every rank gets here, whatever failed: no one is left waiting
        try:
            with open(path, "r+b") as f:
                region = torch.frombuffer(mmap.mmap(f.fileno(), size), dtype=torch.uint8)
        except OSError:
            region = None
        everyone: list = [None] * world
        dist.all_gather_object(everyone, region is not None, group=group)
        if rank == 0 and os.path.exists(path):
            os.unlink(path)  # mapped by every rank that could: nothing is left behind when they exit
        shared = all(everyone)
        if shared:
            made.share(region, capacity)
    if not shared:
        made.use_group((group or dist.group.WORLD).boxed())
    Collectives.reducers = [made]  # this process's model's (a model loaded again replaces it)
    return made


def transport() -> str | None:
    """How this process's tensor-parallel all-reduces travel: "shared memory" (ranks on one machine), the
    process group's backend ("gloo", "nccl"), or None when nothing is split by heads."""
    import torch.distributed as dist

    if Collectives.reducers:
        return "shared memory" if Collectives.reducers[-1].shares_memory() else dist.get_backend()
    return dist.get_backend() if dist.is_initialized() else None


class AllReduce(nn.Module):
    """A row-parallel layer (wo or w2): this rank's partial product, summed over the group, so that every
    rank holds the whole output (by the kernels' Reducer where there is one and the product is on the
    CPU, else by torch.distributed)."""

    def __init__(self, inner: nn.Module, group: Any = None, reducer: Any = None):
        super().__init__()
        self.inner, self.group, self.reducer = inner, group, reducer
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = self.inner(x)
        if self.reducer is not None and y.device.type == "cpu" and y.dtype == torch.float32:
            y = y.contiguous()
            self.reducer.all_reduce_(y)
            return y
        start = time.perf_counter()
        dist.all_reduce(y, group=self.group)
        Collectives.seconds += time.perf_counter() - start
        return y


def parallelize(model: nn.Module, group: Any = None, timeout_s: float = 300.0) -> nn.Module:
    """Complete a rank's model: an all-reduce after each wo and w2, in the Python forward and inside the
    kernels' one-call decode step (DecodePlan) alike, both through one Reducer."""
    on_cpu = model.norm.weight.device.type == "cpu"
    summer = reducer(model.config.dim, timeout_s, group) if on_cpu else None
    for layer in model.layers:
        layer.attention.wo = AllReduce(layer.attention.wo, group, summer)
        layer.feed_forward.w2 = AllReduce(layer.feed_forward.w2, group, summer)
    if getattr(model, "plan", None) is not None:
        if summer is None:
            model.plan = None
        else:
            model.plan.set_reducer(summer)
    import torch.distributed as dist

    if dist.get_rank(group) == 0:
        print(f"llamalite: split by heads over {dist.get_world_size(group)} ranks, all-reduces through "
              f"{transport()}", file=sys.stderr)
    return model


# ----- pipeline stages ------------------------------------------------------------------------------------


