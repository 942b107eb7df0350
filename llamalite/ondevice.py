"""On phones and TVs: a model exported to ExecuTorch, PyTorch's on-device runtime, as a `.pte` program,
and the same program run here through `executorch.runtime`.

The program has one method, `forward(tokens (1, T), input_pos (T,)) -> logits (1, T, vocab)`, T from 1
to its max_seq_len: a prompt's chunks and each decoded token alike. Its KV cache is state of the
program (mutable buffers of max_seq_len positions, written at input_pos), so a runner keeps no cache
of its own; RoPE runs on cos/sin tables (ExecuTorch has no complex numbers). Linear layers are lowered
to XNNPACK, as fp32 or with torchao's 8-bit dynamic activations and 4- or 8-bit grouped weights
(`8da4w`, ExecuTorch's recipe for LLaMA) or 8-bit ones per output channel (`8da8w`).

Beside `model.pte` go `model.tokenizer/` (tokenizer.json or tokenizer.model, with tokenizer_config.json
and the chat template: what ExecuTorch's C++ runner and `pytorch-tokenizers` read) and `model.json`
(the config, max_seq_len and dtype, which llamalite reads back).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .model import Transformer

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

DTYPES = ("fp32", "8da4w", "8da8w")
GROUP = 32  # weights per quantization group (8da4w, 8da8w)


class DeviceExportError(ValueError):
    """A model or setting the export cannot handle, or ExecuTorch missing; the message says what to do."""


def _require_executorch():
    try:
        import executorch.exir  # noqa: F401
    except ImportError:
        raise DeviceExportError("exporting to (or running) ExecuTorch needs the executorch package: "
                                "pip install 'llamalite[device]'") from None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rope in real arithmetic: interleaved pairs (x0, x1) of x (1, T, H, D) turned by (cos, sin) (T, D/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class OnDevice(nn.Module):
    """A Transformer as the exported program computes it: the same modules and weights, its KV cache as
    buffers, RoPE from tables, attention over the whole cache with a causal mask (static shapes)."""

    def __init__(self, model: Transformer, max_seq_len: int):
        super().__init__()
        cfg = model.config
        self.model, self.max_seq_len = model, max_seq_len
        angles = torch.arange(max_seq_len).float()[:, None] * model.inv_freq  # (S, head_dim/2)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.register_buffer("causal", torch.ones(max_seq_len, max_seq_len, dtype=torch.bool).tril())
        for i in range(cfg.n_layers):
            self.register_buffer(f"k{i}", torch.zeros(1, cfg.n_kv_heads, max_seq_len, cfg.head_dim))
            self.register_buffer(f"v{i}", torch.zeros(1, cfg.n_kv_heads, max_seq_len, cfg.head_dim))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        m, c = self.model, self.model.config
        T = tokens.shape[1]
        group = c.n_heads // c.n_kv_heads
        cos, sin, mask = self.cos[input_pos], self.sin[input_pos], self.causal[input_pos]  # (T, .), (T, S)
        x = m.tok_embeddings(tokens)
        for i, layer in enumerate(m.layers):
            a = layer.attention
            h = layer.attention_norm(x)
            q = a.wq(h).view(1, T, c.n_heads, c.head_dim)
            k = a.wk(h).view(1, T, c.n_kv_heads, c.head_dim)
            v = a.wv(h).view(1, T, c.n_kv_heads, c.head_dim)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            k_cache.index_copy_(2, input_pos, k.transpose(1, 2))  # (1, n_kv_heads, S, head_dim)
            v_cache.index_copy_(2, input_pos, v.transpose(1, 2))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.repeat_interleave(group, 1),
                                                 v_cache.repeat_interleave(group, 1), attn_mask=mask)
            x = x + a.wo(out.transpose(1, 2).reshape(1, T, -1))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        return m.output(m.norm(x)).float()


def plain_copy(model: nn.Module) -> Transformer:
    """The model's fp32 weights in a Transformer of plain torch modules (no kernels' ops: the exporter
    traces what runs)."""
    cfg = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if any(not torch.is_floating_point(v) for v in state.values()):
        raise DeviceExportError("the model holds quantized blocks: load it with quantized=False (export does)")
    plain = Transformer(cfg)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith("inv_freq")] or unexpected:
        raise DeviceExportError(f"the model's tensors do not fit a {cfg.family} Transformer "
                                f"({(missing + unexpected)[:3]})")
    return plain.eval()


def export_executorch(model: nn.Module, tokenizer: "Tokenizer | None", out: str | Path, dtype: str = "fp32",
                      max_seq_len: int | None = None, max_memory: int | None = None) -> Path:
    """Write `out` (.pte) with its tokenizer and metadata beside it (see the module); returns its path."""
    _require_executorch()
    from torch.export import Dim, export

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if dtype not in DTYPES:
        raise DeviceExportError(f"unknown dtype {dtype!r} for ExecuTorch; choose one of {', '.join(DTYPES)}")
    cfg: ModelConfig = model.config
    S = min(cfg.context_length, max_seq_len or 2048)
    if S < 2:
        raise DeviceExportError("--max-seq-len must be at least 2")
    cache_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * S * 4
    if max_memory is not None and cache_bytes > max_memory:
        raise DeviceExportError(f"a KV cache of {S} positions takes {cache_bytes / 2**20:.0f} MiB, more than "
                                f"--max-memory {max_memory / 2**20:.0f} MiB: lower --max-seq-len")
    if dtype == "8da4w" and (cfg.dim % GROUP or cfg.hidden_dim % GROUP or (cfg.n_heads * cfg.head_dim) % GROUP):
        raise DeviceExportError(f"{dtype} groups weights by {GROUP}; this model's sizes do not divide: export fp32")
    plain = plain_copy(model)
    if dtype != "fp32":
        _quantize(plain, dtype)
    program = OnDevice(plain, S).eval()
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    T = Dim("T", min=1, max=S)
    # What ExecuTorch's LLM runner (extension/llm/runner) reads from a program, as constant methods.
    metadata = {"get_max_seq_len": S, "get_max_context_len": S, "get_vocab_size": cfg.vocab_size,
                "use_kv_cache": True, "enable_dynamic_shape": True, "use_sdpa_with_kv_cache": False}
    if tokenizer is not None:
        if tokenizer.bos_id is not None:
            metadata["get_bos_id"] = tokenizer.bos_id
        metadata["get_eos_ids"] = sorted(tokenizer.end_ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter; errors still raise
        exported = export(program, example, dynamic_shapes={"tokens": {1: T}, "input_pos": {0: T}}, strict=False)
        lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
        pte = lowered.to_executorch(ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pte.buffer)
    if tokenizer is not None:
        _write_tokenizer(tokenizer, _tokenizer_dir(out))
    _meta_path(out).write_text(json.dumps({"format": "llamalite-executorch", "dtype": dtype, "max_seq_len": S,
                                           "config": cfg.to_dict()}, indent=1))
    return out


def _quantize(model: Transformer, dtype: str) -> None:
    """torchao's 8-bit dynamic activations on every linear layer but the embedding, with int4 weights in
    groups of 32 (ExecuTorch's LLaMA recipe) or int8 weights per output channel (XNNPACK groups only
    4-bit weights)."""
    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError:
        raise DeviceExportError(f"{dtype} needs torchao (installed with executorch: pip install "
                                f"'llamalite[device]')") from None
    config = (Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP))
              if dtype == "8da4w" else
              Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)))
    quantize_(model, config, filter_fn=lambda m, name: isinstance(m, nn.Linear))


def _tokenizer_dir(pte: Path) -> Path:
    return pte.with_suffix(".tokenizer")


def _meta_path(pte: Path) -> Path:
    return pte.with_suffix(".json")


def _write_tokenizer(tokenizer: "Tokenizer", where: Path) -> None:
    from .tokenizer import save_tokenizer

    with tempfile.TemporaryDirectory(dir=where.parent) as tmp:
        save_tokenizer(tokenizer, Path(tmp))
        if where.exists():
            shutil.rmtree(where)
        where.mkdir()
        for f in Path(tmp).iterdir():
            shutil.copyfile(f, where / f.name)


class PteModel:
    """A `.pte` program run through executorch.runtime, with what generate, chat, bench and perplexity ask
    of a model: one sequence, its KV cache inside the program."""

    device = torch.device("cpu")
    kv_type = None

    def __init__(self, path: Path, config: ModelConfig, max_seq_len: int):
        _require_executorch()
        from executorch.runtime import Runtime

        self.path = path
        self.method = Runtime.get().load_program(str(path)).load_method("forward")
        self.config = dataclasses.replace(config, context_length=max_seq_len)
        self.max_seq_len, self.cache_batch = max_seq_len, 1
        self.cache_tokens: list[int] = []

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None) -> None:
        if max_batch_size != 1:
            raise ValueError(f"{self.path.name} is an ExecuTorch program of one sequence: run it with one "
                             f"(serve needs --max-batch 1)")
        if max_seq_len > self.max_seq_len:
            raise ValueError(f"{self.path.name} was exported for {self.max_seq_len} positions, not {max_seq_len}")
        self.cache_tokens = []

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[0] != 1 or (rows is not None and bool((rows != 0).any())):
            raise ValueError(f"{self.path.name} runs one sequence at a time (no batches, drafts or slots)")
        T = tokens.shape[1]
        pos = torch.arange(T) if input_pos is None else input_pos.reshape(-1)
        if int(pos[-1]) >= self.max_seq_len:
            raise ValueError(f"position {int(pos[-1])} is beyond the {self.max_seq_len} positions {self.path.name} "
                             f"was exported for (--max-seq-len)")
        logits = self.method.execute([tokens.long().cpu(), pos.long().cpu()])[0]
        return logits[:, -1:] if last_only else logits


def load_pte(path: Path):
    """A LoadedModel of an exported program and the tokenizer and metadata beside it."""
    from .loading import LoadedModel, ModelFileError
    from .tokenizer import tokenizer_from_hf_dir

    meta_file, tok_dir = _meta_path(path), _tokenizer_dir(path)
    if not meta_file.exists():
        raise ModelFileError(f"{path} has no {meta_file.name} beside it (written by `llamalite export --to "
                             f"executorch`): llamalite needs its config to run the program")
    meta = json.loads(meta_file.read_text())
    cfg = ModelConfig(**{k: v for k, v in meta["config"].items()})
    if not tok_dir.is_dir():
        raise ModelFileError(f"{path} has no tokenizer beside it ({tok_dir.name}/): export it again with its tokenizer")
    tokenizer = tokenizer_from_hf_dir(tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text()) if (tok_dir / "tokenizer_config.json").exists() else {}
    model = PteModel(path, cfg, int(meta["max_seq_len"]))
    return LoadedModel(model, tokenizer, config.get("chat_template"), path, "executorch", metadata=meta)

