"""On phones and TVs: a model exported to ExecuTorch, PyTorch's on-device runtime, as a `.pte` program
(program.py runs the same program here through `executorch.runtime`).

The program has one method, `forward(tokens (1, T), input_pos (T,)) -> logits (1, T, vocab)`, T from 1
to its max_seq_len: a prompt's chunks and each decoded token alike. Its KV cache is state of the
program, written and attended by ExecuTorch's LLM ops (`llama::update_cache`, `llama::custom_sdpa`), so
a runner keeps no cache of its own. The rest is lowered to XNNPACK, as fp32 or on torchao's 8-bit
dynamic activations (ExecuTorch's recipe for LLaMA) with 4-bit weights in groups of 32 that keep a
float minimum each (`8da4w`: a Q4_1 model's weights exactly) or int8 ones per output channel (`8da8w`).

Beside `model.pte` go `model.tokenizer/` (tokenizer.json or tokenizer.model, with tokenizer_config.json
and the chat template: what ExecuTorch's C++ runner and `pytorch-tokenizers` read) and `model.json`
(the config, max_seq_len and dtype, which llamalite reads back).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.config import ModelConfig
from ..model.transformer import Transformer
from .program import DeviceExportError, load_kernels, meta_path, quiet_stderr, require_executorch, tokenizer_dir

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer

DTYPES = ("fp32", "8da4w", "8da8w")
GROUP = 32  # weights per quantization group (8da4w, 8da8w)


@functools.cache
def _register_ops() -> None:
    """ExecuTorch's LLM ops (`llama::update_cache`, `llama::custom_sdpa`) and quantized ones
    (`quantized_decomposed::embedding_byte`) as torch ops, to trace and run the module eagerly."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

    load_kernels()


class OnDevice(nn.Module):
    """A Transformer as the exported program computes it: the same modules and weights, its KV cache as
    buffers (1, max_seq_len, n_kv_heads, head_dim) written by ExecuTorch's `llama::update_cache` and read
    by `llama::custom_sdpa`, which attends from each new position to the ones before it only (no mask
    over the whole cache, no copy of a KV head for each query of its group).

    Everything else is written in ops XNNPACK takes, so each layer is two delegated blocks around the
    attention: RMSNorm's mean of squares as a product with a row of 1/n, RoPE as x*cos + (x R)*sin with R
    the pairs' quarter turn (a head_dim x head_dim product) and cos/sin tables of every position."""

    def __init__(self, model: Transformer, max_seq_len: int):
        super().__init__()
        _register_ops()
        cfg = model.config
        self.model, self.max_seq_len = model, max_seq_len
        angles = torch.arange(max_seq_len).float()[:, None] * model.inv_freq  # (S, head_dim/2)
        self.register_buffer("cos", angles.cos().repeat_interleave(2, -1))  # (S, head_dim), pairs alike
        self.register_buffer("sin", angles.sin().repeat_interleave(2, -1))
        turn = torch.zeros(cfg.head_dim, cfg.head_dim)
        turn[0::2, 1::2] = -torch.eye(cfg.head_dim // 2)  # (x R)[2i] = -x[2i+1], (x R)[2i+1] = x[2i]
        turn[1::2, 0::2] = torch.eye(cfg.head_dim // 2)
        self.register_buffer("turn", turn)
        self.register_buffer("mean_dim", torch.full((1, cfg.dim), 1 / cfg.dim))
        self.register_buffer("mean_head", torch.full((1, cfg.head_dim), 1 / cfg.head_dim))
        for i in range(cfg.n_layers):
            self.register_buffer(f"k{i}", torch.zeros(1, max_seq_len, cfg.n_kv_heads, cfg.head_dim))
            self.register_buffer(f"v{i}", torch.zeros(1, max_seq_len, cfg.n_kv_heads, cfg.head_dim))

    def _norm(self, norm: nn.Module, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(F.linear(x * x, mean) + norm.eps) * norm.weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + F.linear(x, self.turn) * sin

    def _attend(self, i: int, q, k, v, start, input_pos: torch.Tensor) -> torch.Tensor:
        """Layer i's new keys and values into its cache, and its queries' attention over the cache."""
        k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        m, c = self.model, self.model.config
        T = tokens.shape[1]
        start = input_pos[0].item()  # the positions run on from here (the runner's contract)
        torch._check_is_size(start)
        torch._check(start + T <= self.max_seq_len)
        cos, sin = self.cos[input_pos][None, :, None], self.sin[input_pos][None, :, None]  # (1, T, 1, head_dim)
        x = m.tok_embeddings(tokens)
        for i, layer in enumerate(m.layers):
            a = layer.attention
            h = self._norm(layer.attention_norm, x, self.mean_dim)
            q = a.wq(h).view(1, T, c.n_heads, c.head_dim)
            k = a.wk(h).view(1, T, c.n_kv_heads, c.head_dim)
            v = a.wv(h).view(1, T, c.n_kv_heads, c.head_dim)
            if a.q_norm is not None:
                q, k = self._norm(a.q_norm, q, self.mean_head), self._norm(a.k_norm, k, self.mean_head)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            out = self._attend(i, q, k, v, start, input_pos)  # (1, T, n_heads, head_dim)
            x = x + a.wo(out.reshape(1, T, -1))
            x = x + layer.feed_forward(self._norm(layer.ffn_norm, x, self.mean_dim))
        return m.output(self._norm(m.norm, x, self.mean_dim)).float()


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
                      max_seq_len: int | None = None, max_memory: int | None = None,
                      say: Callable[[str], None] = lambda step: None) -> Path:
    """Write `out` (.pte) with its tokenizer and metadata beside it (see the module); returns its path.
    `say` hears each step as it starts (lowering takes minutes for a model of 30 layers)."""
    require_executorch()
    from torch.export import Dim, export

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if dtype not in DTYPES:
        raise DeviceExportError(f"unknown dtype {dtype!r} for ExecuTorch; choose one of {', '.join(DTYPES)}")
    cfg: ModelConfig = model.config
    missing = [what for what, there in (
        ("a mixture of experts", cfg.n_experts), ("attention sinks", cfg.attention_sinks),
        ("sliding windows", cfg.sliding_window), ("chunked attention", cfg.attention_chunk),
        ("layers without RoPE", cfg.nope_layer_step), ("q/k L2 norms", cfg.qk_l2_norm),
        ("an output projection bias", cfg.o_bias), ("YaRN", cfg.rope_scaling is not None and cfg.rope_scaling.kind == "yarn"))
        if there]
    if missing:
        raise DeviceExportError(f"the ExecuTorch program cannot yet run {', '.join(missing)}: run this model from its GGUF "
                                f"or Hugging Face files (llamalite export --to gguf)")
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
        say(f"quantizing ({dtype})")
        _quantize(plain, dtype)
    program = OnDevice(plain, S).eval()
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    T = Dim("T", min=1, max=S)
    # What ExecuTorch's LLM runner (extension/llm/runner) reads from a program, as constant methods.
    metadata = {"get_max_seq_len": S, "get_max_context_len": S, "get_vocab_size": cfg.vocab_size,
                "use_kv_cache": True, "enable_dynamic_shape": True, "use_sdpa_with_kv_cache": True}
    if tokenizer is not None:
        if tokenizer.bos_id is not None:
            metadata["get_bos_id"] = tokenizer.bos_id
        metadata["get_eos_ids"] = sorted(tokenizer.end_ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter; errors still raise
        say("tracing (torch.export)")
        exported = export(program, example, dynamic_shapes={"tokens": {1: T}, "input_pos": {0: T}}, strict=False)
        say(f"lowering {cfg.n_layers} layers to XNNPACK")
        lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
        say("writing the program")
        pte = lowered.to_executorch(ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # a killed export leaves no half program under the name
    partial.write_bytes(pte.buffer)
    os.replace(partial, out)
    if tokenizer is not None:
        _write_tokenizer(tokenizer, tokenizer_dir(out))
        differs = _device_tokenizer_differs(tokenizer, tokenizer_dir(out))
        if differs:
            warnings.warn(f"ExecuTorch's C++ tokenizer (pytorch-tokenizers, what its runner reads) splits text "
                          f"otherwise than the model's tokenizer: {differs}. llamalite runs the program right; "
                          f"on a device, give the runner the model's own tokenizer file", stacklevel=2)
    meta_path(out).write_text(json.dumps({"format": "llamalite-executorch", "dtype": dtype, "max_seq_len": S,
                                           "config": cfg.to_dict()}, indent=1))
    return out


def _quantize(model: Transformer, dtype: str) -> None:
    """The quantized recipes, on 8-bit dynamic activations (torchao's 8da, ExecuTorch's recipe for LLaMA):

    - 8da4w: each linear layer but the output in groups of 32 4-bit weights with a float minimum each
      (`Int4Groups`: a Q4_1 model's weights come back exactly);
    - 8da8w: those layers as int8 weights per output channel (XNNPACK groups only 4-bit weights);
    - both: the output layer as int8 per output channel, and the embedding as int8 in groups of 32 (a Q8_0
      table comes back exactly), looked up by ExecuTorch's quantized `embedding_byte`.
    """
    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis
    except ImportError:
        raise DeviceExportError(f"{dtype} needs torchao (installed with executorch: pip install "
                                f"'llamalite[device]')") from None
    per_channel = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if dtype == "8da4w":
        means: dict[int, torch.Tensor] = {}  # one per width, shared by the layers
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child is not model.output:
                    layer = Int4Groups(child, means.get(child.in_features))
                    means[child.in_features] = layer.means
                    setattr(parent, name, layer)
        quantize_(model, per_channel, filter_fn=lambda m, name: m is model.output)
    else:
        quantize_(model, per_channel, filter_fn=lambda m, name: isinstance(m, nn.Linear))
    model.tok_embeddings = Int8Embedding(model.tok_embeddings.weight.detach())


class Int4Groups(nn.Module):
    """A linear layer as 4-bit weights in groups of 32, w = d*q + m with q in 0..15 and d, m floats per
    group: Q4_1's form, so a Q4_1 model's weights come back exactly, and on others a rounding with no range
    wasted on a group that is not centred. XNNPACK runs symmetric int4 groups, so the product is taken as
    d*(q - 8) on 8-bit dynamic activations plus (m + 8d) times each group's sum of the input (an fp32
    product 1/32 the size)."""

    def __init__(self, linear: nn.Linear, means: torch.Tensor | None = None):
        super().__init__()
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

        w = linear.weight.detach().float()
        n_out, n_in = w.shape
        groups = w.view(n_out, n_in // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        d = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = ((groups - low[..., None]) / d[..., None]).round().clamp(0, 15)
        self.linear = nn.Linear(n_in, n_out, bias=linear.bias is not None)
        if linear.bias is not None:
            self.linear.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.linear.weight = nn.Parameter(IntxUnpackedToInt8Tensor.from_hp(
            (d[..., None] * (q - 8)).view(n_out, n_in), (1, GROUP), torch.int4,
            activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
            intx_choose_qparams_algorithm=None, custom_scale=d, custom_zero_point=torch.zeros_like(d, dtype=torch.int8)),
            requires_grad=False)
        self.offsets = nn.Linear(n_in // GROUP, n_out, bias=False)
        self.offsets.weight = nn.Parameter((low + 8 * d) * GROUP, requires_grad=False)  # on the groups' means
        if means is None or means.shape != (n_in // GROUP, n_in):
            means = torch.eye(n_in // GROUP).repeat_interleave(GROUP, 1) / GROUP
        self.register_buffer("means", means)  # (groups, n_in): the product that takes each group's mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offsets(F.linear(x, self.means))


class Int8Embedding(nn.Module):
    """An embedding table as int8 with a scale for each group of 32 (one per row where the width does not
    divide), looked up by ExecuTorch's `quantized_decomposed::embedding_byte`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        _register_ops()
        w = weight.float()
        size = GROUP if w.shape[1] % GROUP == 0 else w.shape[1]
        groups = w.view(w.shape[0], -1, size)
        scale = (groups.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("weight", (groups / scale[..., None]).round().clamp(-127, 127).to(torch.int8).view_as(w))
        self.register_buffer("scales", scale if size == GROUP else scale[:, 0])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.dtype(self.weight, self.scales, None, -128, 127, tokens,
                                                                   dtype=torch.float32)


PROBE = ("Hello world! It's 2026-11-30: 3.14159, 1,000,000 and x^2.\n\n\tIndented  twice   over.\n"
         "Café naïve Zürich 東京 🙂 <|im_start|>user\n")


def _device_tokenizer_differs(tokenizer: "Tokenizer", where: Path) -> str | None:
    """How ExecuTorch's own tokenizer library reads the tokenizer file written in `where` differs from
    `tokenizer` on a probe text (None where it agrees or the library is not installed)."""
    try:
        with quiet_stderr():  # it says at import which regex engine it falls back on
            import pytorch_tokenizers
    except ImportError:
        return None
    if (where / "tokenizer.json").exists():
        device, file = pytorch_tokenizers.CppHFTokenizer(), where / "tokenizer.json"
    else:
        device, file = pytorch_tokenizers.CppSPTokenizer(), where / "tokenizer.model"
    with quiet_stderr():  # it logs its regex compilation at info level
        device.load(str(file))
        theirs = list(device.encode(PROBE, 0, 0))
    ours = tokenizer.encode(PROBE, add_bos=False, parse_special=True)  # the runner adds its BOS apart
    if theirs == ours:
        return None
    at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
    return f"{PROBE!r} is {len(ours)} tokens here, {len(theirs)} there, first apart at token {at}"


def _write_tokenizer(tokenizer: "Tokenizer", where: Path) -> None:
    from ..text.tokenizer import save_tokenizer

    with tempfile.TemporaryDirectory(dir=where.parent) as tmp:
        save_tokenizer(tokenizer, Path(tmp))
        if where.exists():
            shutil.rmtree(where)
        where.mkdir()
        for f in Path(tmp).iterdir():
            shutil.copyfile(f, where / f.name)


