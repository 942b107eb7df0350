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
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from ..model.config import ModelConfig


class ParallelError(ValueError):
    """A model or setting that cannot be split as asked, with what to do instead."""


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group: rank `rank` of `world`."""
    rank: int
    world: int


def _even(units: int, world: int) -> list[tuple[int, int]]:
    """`units` split into `world` contiguous ranges as evenly as possible, the larger ones first."""
    base, extra = divmod(units, world)
    out, start = [], 0
    for r in range(world):
        n = base + (r < extra)
        out.append((start, start + n))
        start += n
    return out


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
        if world > cfg.n_kv_heads:
            raise ParallelError(f"tensor parallelism over {world} ranks needs at least {world} key/value-head groups; "
                                f"this model has {cfg.n_kv_heads}: use at most {cfg.n_kv_heads} ranks")
        rep, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
        for lo, hi in _even(cfg.n_kv_heads, world):
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
        return _even(self.cfg.n_kv_heads, self.shard.world)[self.shard.rank]

    @property
    def hidden(self) -> tuple[int, int]:
        """This rank's feed-forward rows of w1/w3 (columns of w2), [lo, hi), on whole w2 blocks."""
        lo, hi = _even(self.cfg.hidden_dim // self.w2_block, self.shard.world)[self.shard.rank]
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


# ----- pipeline stages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stages:
    """A pipeline split (as llama.cpp's default over several devices): rank r of N holds a contiguous run
    of the layers, dealt out as evenly as whole layers allow; the embedding, final norm and output layer
    are on every rank (replicated, as in the tensor-parallel split)."""
    cfg: ModelConfig
    shard: Shard

    def __post_init__(self):
        if self.shard.world > self.cfg.n_layers:
            raise ParallelError(f"a pipeline over {self.shard.world} ranks needs at least as many layers; this model "
                                f"has {self.cfg.n_layers}")

    @property
    def layers(self) -> tuple[int, int]:
        return _even(self.cfg.n_layers, self.shard.world)[self.shard.rank]

    def local_config(self) -> ModelConfig:
        lo, hi = self.layers
        return dataclasses.replace(self.cfg, n_layers=hi - lo)

    def rename(self, name: str) -> str | None:
        """Meta-named weight `name` as this rank's model names it (its layers counted from 0), or None
        when another rank holds it."""
        if not name.startswith("layers."):
            return name
        index, rest = name[len("layers."):].split(".", 1)
        lo, hi = self.layers
        return f"layers.{int(index) - lo}.{rest}" if lo <= int(index) < hi else None

    def ranges(self, name: str) -> tuple[None, None]:
        """A stage keeps each of its weights whole."""
        return None, None


class _FromPrevious(nn.Module):
    """A later stage's input: the previous stage's hidden states, received in place of the embedding."""

    def __init__(self, src: int, width: int, dtype: torch.dtype):
        super().__init__()
        self.src, self.width, self.dtype = src, width, dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = torch.empty(*tokens.shape, self.width, dtype=self.dtype, device=tokens.device)
        start = time.perf_counter()
        dist.recv(x, self.src)
        Collectives.seconds += time.perf_counter() - start
        return x


class _ThenSend(nn.Module):
    """A stage's last block, whose output goes on to the next stage. The send does not wait for the next
    stage to take it (so that this stage goes on with the next micro-batch of a prompt); `drain` waits
    for every send still under way."""

    def __init__(self, block: nn.Module, dst: int):
        super().__init__()
        self.block, self.dst = block, dst
        self.pending: list = []

    def forward(self, *args: Any) -> torch.Tensor:
        import torch.distributed as dist

        y = self.block(*args)
        start = time.perf_counter()
        self.pending.append(dist.isend(y.contiguous(), self.dst))
        Collectives.seconds += time.perf_counter() - start
        return y

    def drain(self) -> None:
        start = time.perf_counter()
        while self.pending:
            self.pending.pop(0).wait()
        Collectives.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:  # attention, feed_forward, ... as the block has them
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


class _FromLast(nn.Module):
    """The final norm or output layer: computed on the last stage and broadcast, so that every rank ends
    a forward with the same hidden states and logits (as in the tensor-parallel split)."""

    def __init__(self, inner: nn.Module, src: int, width: int | None = None):
        super().__init__()
        self.inner, self.src, self.width = inner, src, width
        self.skip = False  # a micro-batch whose logits nobody reads: no output, no broadcast

    @property
    def weight(self) -> torch.Tensor:  # Transformer.device reads the norm's
        return self.inner.weight

    @property
    def eps(self) -> float:
        return self.inner.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.skip:
            return x if self.width is None else x.new_empty(*x.shape[:-1], 0)
        if dist.get_rank() == self.src:
            y = self.inner(x).float().contiguous()
        else:
            y = torch.empty(*x.shape[:-1], self.width or x.shape[-1], dtype=torch.float32, device=x.device)
        start = time.perf_counter()
        dist.broadcast(y, self.src)
        Collectives.seconds += time.perf_counter() - start
        return y if self.width else y.to(x.dtype)


MICRO_BATCH = 16  # the fewest prompt tokens in a micro-batch: smaller ones make the products less efficient


def pipeline(model: nn.Module, shard: Shard) -> nn.Module:
    """Complete a stage's model: its input from the previous stage (after the first), its output on to the
    next (before the last), the last stage's norm and logits broadcast to all.

    A prompt's cached prefill (a forward with positions that wants the last logits only) goes through the
    stages in micro-batches of its tokens: while a stage works on one, the stage before it already works
    on the next, as llama.cpp pipelines a prompt over devices. Sequential stages would leave each rank
    idle for the others' share of the prompt. (Decoding gains nothing from micro-batches on a memory-bound
    CPU: a stage reads all its weights for one row as for several, so splitting the batch costs as much
    as it overlaps; see BENCHMARKS.md.)"""
    last = shard.world - 1
    cfg = model.config
    if shard.rank > 0:
        model.tok_embeddings = _FromPrevious(shard.rank - 1, cfg.dim, model.norm.weight.dtype)
    if shard.rank < last:
        model.layers[-1] = _ThenSend(model.layers[-1], shard.rank + 1)
    model.norm = _FromLast(model.norm, last)
    model.output = _FromLast(model.output, last, cfg.vocab_size)
    # The kernels' one-call step over this stage's layers (DecodePlan.step_stage), for decoding; the model's
    # own forward (FastTransformer) must not take it for the whole model's step.
    plan = getattr(model, "plan", None)
    if plan is not None:
        model.plan, model.stage_plan = None, plan
    whole = model.forward
    ends = (model.norm, model.output)
    sender = model.layers[-1] if shard.rank < last else None

    def plan_step(tokens: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
        """One decode step of this stage through the plan: the previous stage's hidden states in, this
        stage's out to the next (the last: the logits, broadcast to all); None where the plan cannot run."""
        import torch.distributed as dist

        B = tokens.shape[0]
        if (plan is None or tokens.shape[1] != 1 or tokens.device.type != "cpu" or torch.compiler.is_compiling()
                or int(input_pos.max()) >= model.max_seq_len or not model._plan_ready(plan)):
            return None
        pos = input_pos.reshape(-1).expand(B)
        rows = torch.arange(B) if rows is None else rows
        start = time.perf_counter()
        hidden = torch.empty(0)
        if shard.rank > 0:
            hidden = torch.empty(B, cfg.dim)
            dist.recv(hidden, shard.rank - 1)
        Collectives.seconds += time.perf_counter() - start
        out = plan.step_stage(tokens.reshape(-1), pos, rows, hidden, shard.rank == last)
        start = time.perf_counter()
        if shard.rank < last:
            dist.send(out, shard.rank + 1)
            out = torch.empty(B, cfg.vocab_size)
        dist.broadcast(out, last)
        Collectives.seconds += time.perf_counter() - start
        return out.view(B, 1, -1)

    def forward(tokens: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        T = tokens.shape[1]
        micro = max(MICRO_BATCH, -(-T // (2 * shard.world)))
        try:
            if input_pos is not None and T == 1:
                logits = plan_step(tokens, input_pos, rows)
                if logits is not None:
                    return logits
            if input_pos is None or not last_only or T < 2 * micro:
                return whole(tokens, input_pos, last_only, rows)
            cuts = list(range(0, T, micro))
            for end in ends:
                end.skip = True
            try:
                for lo in cuts[:-1]:
                    whole(tokens[:, lo:lo + micro], input_pos[..., lo:lo + micro], True, rows)
            finally:
                for end in ends:
                    end.skip = False
            return whole(tokens[:, cuts[-1]:], input_pos[..., cuts[-1]:], True, rows)
        finally:
            if sender is not None:
                sender.drain()

    model.forward = forward  # nn.Module.__call__ calls the instance's
    return model
