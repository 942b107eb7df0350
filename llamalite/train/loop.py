"""Pretraining with the LLaMA recipe, as one plain loop you can import: `train(TrainConfig(...))`.

Recipe defaults (Touvron et al. 2023, section 2.2): AdamW with beta1 0.9, beta2 0.95, weight decay
0.1 on the matrices, gradient clipping at 1.0, a cosine schedule down to 10% of the peak learning
rate after a linear warmup. Batches are random windows of the prepared token shards, drawn from a
seeded generator whose state is saved with every checkpoint, together with the model, the
optimizer, the step and the RNG states: a resumed run continues exactly where the checkpoint left
it, and its loss curve equals the uninterrupted run's step for step.

Checkpoints are written to a temporary file and renamed (a crash mid-save never leaves a broken
`ckpt-*.pt`); the last `keep` are kept, plus `best.pt` (lowest validation loss). A checkpoint that is
unreadable anyway (truncated by a full disk, say) is reported and the one before it is used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..formats.checkpoint import CHECKPOINT_VERSION, atomic_write, checkpoints_in, load_latest_checkpoint, save_checkpoint
from ..model.config import ModelConfig
from ..model.transformer import Transformer, cross_entropy_loss
from .config import TrainConfig
from .data import DataError, TokenData


class TrainError(ValueError):
    """A training setup that cannot run; the message says why and what to do."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    sizes = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                 hidden_dim=cfg.hidden_dim, tie_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta)
    if cfg.preset:
        try:
            return ModelConfig.from_preset(cfg.preset, vocab_size=vocab_size, context_length=cfg.seq_len)
        except KeyError as e:
            raise TrainError(str(e).strip('"')) from None
    return ModelConfig(**sizes, vocab_size=vocab_size, context_length=cfg.seq_len)


def count_parameters(m: ModelConfig) -> int:
    """Parameters of the model a config describes, without building it."""
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    layer = m.dim * (2 * q + 2 * kv) + 3 * m.dim * m.hidden_dim + 2 * m.dim
    return m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + m.n_layers * layer + m.dim


def estimate_memory(mcfg: ModelConfig, cfg: TrainConfig, n_params: int, n_trainable: int) -> int:
    """Bytes a training step needs, roughly: fp32 weights (4 bytes a parameter), gradients and AdamW's
    two moments (12 more a trained parameter), the activations kept for backward, and the logits."""
    b, t, d, h = cfg.batch_size, cfg.seq_len, mcfg.dim, mcfg.n_heads
    per_layer = b * t * (16 * d + 3 * mcfg.hidden_dim + 2 * mcfg.n_kv_heads * mcfg.head_dim) * 4 + b * h * t * t * 4
    layers = per_layer * (1 if cfg.checkpointing else mcfg.n_layers) + (b * t * d * 4 * mcfg.n_layers if cfg.checkpointing else 0)
    logits = b * t * mcfg.vocab_size * 4 * 3
    return 4 * n_params + 12 * n_trainable + layers + logits


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


@dataclass
class _State:
    step: int = 0
    best_val: float = float("inf")
    tokens: int = 0
    history: list[dict] = field(default_factory=list)  # the metrics records so far


def draw(n: int, gen: torch.Generator, batch_size: int, rank: int, world: int) -> list[int]:
    """This process's share of one global micro-batch of indices below n: every process draws the same
    global batch from the same generator and takes its own rows, so N processes see what one would."""
    picks = torch.randint(n, (batch_size * world,), generator=gen)[rank * batch_size:(rank + 1) * batch_size]
    return picks.tolist()


def _batch(data: TokenData, gen: torch.Generator, cfg: TrainConfig, rank: int, world: int, device):
    """This process's share of one global micro-batch of random windows (see draw)."""
    picks = draw(data.valid_starts(cfg.seq_len + 1), gen, cfg.batch_size, rank, world)
    rows = torch.stack([torch.from_numpy(data.window(k, cfg.seq_len + 1)) for k in picks])
    rows = rows.to(device)
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device, autocast,
             world: int = 1) -> float:
    """Mean loss per scored token over the given validation batches (this process's share of each),
    averaged over every process."""
    model.eval()
    nll, count = 0.0, 0
    for x, y in batches:
        with autocast():
            n = int((y != -100).sum())
            nll += float(cross_entropy_loss(model(x), y)) * n
            count += n
    model.train()
    nll, count = _sum_over_ranks([nll, count], world, device)
    return nll / max(count, 1)


def _write_metrics(out: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in history)
    atomic_write(out / "metrics.jsonl", lambda p: p.write_text(text))


def plot_losses(out: Path, history: list[dict]) -> None:
    """loss.png next to the checkpoints: training loss per step and validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _precision(cfg: TrainConfig, device: torch.device):
    mode = cfg.precision
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if mode not in ("fp32", "bf16"):
        raise TrainError(f"precision must be fp32, bf16 or auto, got {cfg.precision!r}")
    if mode == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device): under torchrun (WORLD_SIZE > 1) the process group is set up,
    gloo on the CPU and nccl on GPUs; multi-node runs come through torchrun's rendezvous."""
    device = torch.device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _parallelize(model: Transformer, cfg: TrainConfig, world: int, device: torch.device) -> torch.nn.Module:
    if world == 1:
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    raise TrainError(f"parallel must be ddp or fsdp, got {cfg.parallel!r}")


def _grad_sync(net: torch.nn.Module, sync: bool):
    """Gradient averaging across processes only on the last micro-batch of an accumulated step."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if hasattr(net, "no_sync"):  # DDP
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused():
            net.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                net.set_requires_gradient_sync(True)
        return paused()
    return contextlib.nullcontext()


def _sum_over_ranks(values: list[float], world: int, device: torch.device) -> list[float]:
    """Each value summed over every process, in one collective."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


@dataclass
class Job:
    """What the loop trains: `train` builds one for a new model on prepared shards, `finetune` for a
    loaded model on records. One loop runs both."""
    model: Transformer
    # (data generator, rank, world) -> this process's share of one global micro-batch, (inputs, targets)
    # on the device; targets of -100 are not scored
    batch: Callable[[torch.Generator, int, int], tuple[torch.Tensor, torch.Tensor]]
    # (rank, world) -> the fixed validation batches; None when there is no held-out data
    val_batches: Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None
    # what the model and data are: a resumed run must match it (model_config, data, and more)
    identity: dict
    info: dict = field(default_factory=dict)  # saved with every checkpoint for export (e.g. base model, LoRA)


_IDENTITY_LABELS = {"model_config": "a different model", "data": "data from another tokenizer or other records",
                    "base": "another base model", "lora": "another LoRA setup"}


def train(cfg: TrainConfig) -> dict:
    """Pretrain (or resume) a new model on `llamalite prepare`'s shards; returns a summary."""
    if not cfg.data:
        raise TrainError("no training data: set data to a directory made by `llamalite prepare`")
    check_sizes(cfg)
    rank, world, device = setup_distributed(cfg)
    train_data, val_data = TokenData.open(cfg.data, "train"), TokenData.open(cfg.data, "val")
    for split, d in (("train", train_data), ("val", val_data)):
        if d.valid_starts(cfg.seq_len + 1) == 0:
            raise DataError(f"the {split} split of {cfg.data} has {d.tokens} tokens, fewer than one window of "
                            f"seq_len + 1 = {cfg.seq_len + 1}: use a shorter seq_len or more text")
    mcfg = model_config(cfg, train_data.index["vocab_size"])
    n_params = count_parameters(mcfg)
    check_memory(cfg, device, estimate_memory(mcfg, cfg, n_params, n_params), n_params)
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).to(device)
    model.init_weights(torch.Generator(device=device).manual_seed(cfg.seed) if device.type == "cpu" else None)

    def val_batches(rank: int, world: int):
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same windows at every evaluation
        return (_batch(val_data, gen, cfg, rank, world, device) for _ in range(cfg.eval_batches))

    job = Job(model, lambda gen, rank, world: _batch(train_data, gen, cfg, rank, world, device), val_batches,
              identity={"model_config": mcfg.to_dict(), "data": train_data.index["tokenizer"]["fingerprint"]})
    return run(cfg, job, rank, world, device)


def check_sizes(cfg: TrainConfig) -> None:
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "keep", "eval_every", "save_every"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"{name} must be at least 1, got {getattr(cfg, name)}")


def check_memory(cfg: TrainConfig, device: torch.device, need: int, n_params: int) -> None:
    """Refuse, before anything big is allocated, a run that will not fit."""
    if not cfg.memory_check:
        return
    free = _available_memory(device)
    if need > 0.9 * free:
        raise TrainError(f"this run needs about {need / 2**30:.1f} GiB ({n_params / 1e6:.1f}M parameters, "
                         f"batch {cfg.batch_size} x {cfg.seq_len} tokens) but {free / 2**30:.1f} GiB is free on "
                         f"{device}: lower batch_size (raise grad_accum to keep the batch), seq_len or the model "
                         f"size, or turn on checkpointing")


def _resume_from(cfg: TrainConfig, job: Job, out: Path, rank: int) -> dict | None:
    """The checkpoint to continue from (None: start at step 0), after checking it is this run's."""
    if not cfg.resume:
        if checkpoints_in(out):
            raise TrainError(f"{out} already holds checkpoints; continue them with --resume, or choose another --out")
        return None
    ckpt = load_latest_checkpoint(out)
    if rank == 0:
        print(f"llamalite: nothing to resume in {out}; starting from step 0" if ckpt is None else
              f"llamalite: resuming from {ckpt['path']} (step {ckpt['step']})", file=sys.stderr)
    if ckpt is None:
        return None
    saved = ckpt.get("identity") or {"model_config": ckpt["model_config"], "data": ckpt.get("data_fingerprint")}
    differ = []
    for key, value in job.identity.items():
        if saved.get(key) != value:
            label = _IDENTITY_LABELS.get(key, f"another {key}")
            if key == "model_config":
                old = saved.get(key) or {}
                label += f" ({', '.join(k for k in value if old.get(k) != value[k])} differ)"
            differ.append(label)
    if differ:
        raise TrainError(f"{ckpt['path']} was trained with {'; '.join(differ)}: resume with the settings and data "
                         f"it was trained with, or choose another --out")
    return ckpt


def run(cfg: TrainConfig, job: Job, rank: int = 0, world: int = 1, device: torch.device | None = None) -> dict:
    """The training loop: run (or resume) `job` for cfg.steps optimizer steps."""
    from tqdm import tqdm

    device = device or torch.device(cfg.device)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _resume_from(cfg, job, out, rank)
    model = job.model
    model.checkpointing = cfg.checkpointing
    net = _parallelize(model, cfg, world, device)  # what the forward runs through
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=device.type == "cuda")
    # Frozen weights (a LoRA base) are not saved: the checkpoint holds what training changes.
    sd_options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    gen = torch.Generator().manual_seed(cfg.seed)
    state = _State()
    if ckpt is not None:
        set_state_dict(model, opt, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=len(trainable) == len(list(model.parameters()))))
        gen.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        state = _State(ckpt["step"], ckpt["best_val"], ckpt["tokens"], list(ckpt["history"]))
        if rank == 0:
            _write_metrics(out, state.history)  # drop what an interrupted run logged after this checkpoint
    autocast = _precision(cfg, device)
    model.train()
    bar = tqdm(total=cfg.steps, initial=state.step, desc="training", unit="step",
               disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    val_loss = None
    for step in range(state.step, cfg.steps):
        t_start = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        total, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            x, y = job.batch(gen, rank, world)
            with _grad_sync(net, micro == cfg.grad_accum - 1), autocast():
                loss = cross_entropy_loss(net(x), y) / cfg.grad_accum
                loss.backward()
            total += float(loss.detach())
            tokens += int((y != -100).sum())
        total, tokens = _sum_over_ranks([total, tokens], world, device)
        total, tokens = total / world, round(tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step, state.tokens = step + 1, state.tokens + tokens
        record = {"step": state.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
                  "tok_s": tokens / max(time.perf_counter() - t_start, 1e-9)}
        last = state.step == cfg.steps
        if job.val_batches is not None and (state.step % cfg.eval_every == 0 or last):
            val_loss = evaluate(net, job.val_batches(rank, world), device, autocast, world)
            record["val_loss"] = val_loss
        state.history.append(record)
        bar.set_postfix(loss=f"{total:.3f}", val=f"{val_loss:.3f}" if val_loss is not None else "-",
                        tok_s=f"{record['tok_s']:.0f}")
        bar.update(1)
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if state.step % cfg.save_every == 0 or last:
            best = "val_loss" in record and record["val_loss"] < state.best_val
            if best:
                state.best_val = record["val_loss"]
            # Gathered on every process (a collective under FSDP), written by the first.
            msd, osd = get_state_dict(model, opt, options=sd_options)
            msd = {k: v for k, v in msd.items() if k not in frozen}  # a tied alias of a frozen weight too
            if rank == 0:
                save_checkpoint(out, {
                    "version": CHECKPOINT_VERSION, "step": state.step, "model": msd, "optimizer": osd,
                    "train_config": dataclasses.asdict(cfg), "model_config": model.config.to_dict(),
                    "identity": job.identity, **job.info, "best_val": state.best_val, "tokens": state.tokens,
                    "history": state.history, "rng": {"data": gen.get_state(), "torch": torch.get_rng_state()},
                }, cfg.keep, best)
                plot_losses(out, state.history)
            if world > 1:
                torch.distributed.barrier()
    bar.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    final = state.history[-1] if state.history else {}
    n_params = sum(p.numel() for p in model.parameters())
    return {"steps": state.step, "loss": final.get("loss"), "val_loss": val_loss,
            "best_val": state.best_val if state.best_val < float("inf") else None, "parameters": n_params,
            "trainable": sum(p.numel() for p in trainable), "out": str(out), "tokens": state.tokens}
