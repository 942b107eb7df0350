"""A pipeline split (as llama.cpp's default over several devices): each rank holds a contiguous run of
the layers and hands its hidden states on to the next."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.config import ModelConfig
from .group import Collectives, ParallelError, Shard, even


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
        return even(self.cfg.n_layers, self.shard.world)[self.shard.rank]

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
