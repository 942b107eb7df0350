"""The LLaMA transformer, one file: RMSNorm, RoPE (with Llama 3.1 scaling), grouped-query attention
over a static KV cache, SwiGLU feed-forward, optional tied embeddings.

Parameter names follow Meta's reference (meta-llama/llama3 `llama/model.py`), so a Meta checkpoint
loads as it is and every other format maps onto these names in its loader. RoPE rotates interleaved
pairs (x0, x1), (x2, x3), ... as Meta's complex-number formulation does; GGUF stores q/k in that
layout and the HF loader permutes its half-split layout back to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import ModelConfig, RopeScaling
from ..kernels.ops import kernels_available


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference does.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies of RoPE, shape (head_dim // 2,), fp32, on the CPU (also when the model is
    built on the meta device: these are computed, never loaded)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is None:
        return inv
    if scaling.kind == "yarn":  # as transformers' _compute_yarn_parameters
        def dim_of(rotations: float) -> float:
            return head_dim * math.log(scaling.original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low if high != low else 0.001)).clamp(0, 1)
        extrapolate = 1 - ramp
        return inv / scaling.factor * (1 - extrapolate) + inv * extrapolate
    # Llama 3.1 (meta-llama/llama-models `apply_scaling`): leave high frequencies alone, divide low
    # ones by `factor`, and interpolate smoothly between the two wavelength bands.
    low_wavelen = scaling.original_context / scaling.low_freq_factor
    high_wavelen = scaling.original_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)


def rope_magnitude(scaling: RopeScaling | None) -> float:
    """What YaRN multiplies cos and sin by (its attention factor, 0.1 ln(factor) + 1); 1 otherwise."""
    if scaling is None or scaling.kind != "yarn" or scaling.factor <= 1:
        return 1.0
    return 0.1 * math.log(scaling.factor) + 1.0


def rope_rotations(positions: torch.Tensor, inv_freq: torch.Tensor, magnitude: float = 1.0) -> torch.Tensor:
    """magnitude * e^(i*angle) for each position and frequency, angle = float(position) * inv_freq, as Meta's
    freqs_cis: (..., head_dim/2) complex. The one place these are computed: the kernels' decode step takes
    its table from here too, so both rotate by the same values on every host."""
    angles = positions.float()[..., None] * inv_freq
    return torch.polar(torch.full_like(angles, magnitude), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, D), read as complex numbers, by rot = e^(i*angle),
    (T, D/2) shared by the batch or (B, T, D/2) per row."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, D/2) complex
    return torch.view_as_real(xc * rot.unsqueeze(-2)).flatten(-2).type_as(x)


KV_TYPES = ("f32", "f16", "bf16", "q8_0")  # what a KV cache can hold (--kv-type)
_KV_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def kv_type_name(kind: "str | torch.dtype") -> str:
    """A KV type's name ("f16", ...) from a name or a torch dtype; anything else is refused."""
    if isinstance(kind, torch.dtype):
        for name, dtype in _KV_DTYPES.items():
            if dtype == kind:
                return name
        raise ValueError(f"a KV cache of {kind} is not supported: use one of {', '.join(KV_TYPES)}")
    if kind not in KV_TYPES:
        raise ValueError(f"unknown KV cache type {kind!r}: use one of {', '.join(KV_TYPES)}")
    return kind


class KVCache(nn.Module):
    """Static per-layer cache of keys and values, (B, n_kv_heads, max_seq_len, head_dim), in one of
    KV_TYPES: fp32, fp16 or bf16 values, or Q8_0 blocks (per position and head, head_dim / 32 blocks of
    an fp16 scale and 32 int8 values, 34 bytes, in the kernels' packed layout: needs the kernels).
    Keys and values come in and go out in the model's dtype; what is stored is rounded to the type."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: "torch.dtype | str",
                 device: torch.device | str | None = None):
        super().__init__()
        self.kind = kv_type_name(dtype)
        self.head_dim = head_dim
        if self.kind == "q8_0":
            if torch.device(device or "cpu").type != "cpu" or not kernels_available():
                raise ValueError("a q8_0 KV cache needs the CPU kernels (llamalite.kernels._cpu): use f16 or bf16 here")
            if head_dim % 32:
                raise ValueError(f"a q8_0 KV cache needs a head_dim that divides by 32, not {head_dim}: use f16")
            shape, storage = (batch, n_kv_heads, max_seq_len, head_dim // 32 * 34), torch.uint8
        else:
            shape, storage = (batch, n_kv_heads, max_seq_len, head_dim), _KV_DTYPES[self.kind]
        self.register_buffer("k", torch.zeros(shape, dtype=storage, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=storage, device=device), persistent=False)

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "q8_0":
            return x.to(self.k.dtype)
        return torch.ops.llamalite.quantize_q8_0(x.reshape(-1, self.head_dim)).view(*x.shape[:-1], -1)

    def _load(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kind != "q8_0":
            return x.to(dtype)
        flat = torch.ops.llamalite.dequantize(x.reshape(-1, x.shape[-1]), 8)  # 8: ggml's Q8_0
        return flat.view(*x.shape[:-1], self.head_dim).to(dtype)

    def shift(self, row: int, keep: int, discard: int, end: int, rot: torch.Tensor) -> None:
        """Context shift: drop positions keep .. keep+discard-1 of cache row `row` (filled up to `end`),
        moving the rest down by `discard`; the moved keys are turned back by rot = e^(-i*discard*freq),
        in place of recomputing them at their new positions (RoPE's rotations add up)."""
        src, dst = slice(keep + discard, end), slice(keep, end - discard)
        k = self._load(self.k[row, :, src], torch.float32)  # (n_kv_heads, n, head_dim)
        k = torch.view_as_real(torch.view_as_complex(k.unflatten(-1, (-1, 2))) * rot).flatten(-2)
        self.k[row, :, dst] = self._store(k)
        self.v[row, :, dst] = self.v[row, :, src].clone()

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int,
               rows: torch.Tensor | None = None):
        # k, v: (B, n_kv_heads, T, head_dim), written at their absolute positions (input_pos (T,) or
        # (B, T)) in cache rows `rows` (B,) (default: rows 0..B-1); positions up to `end` come back.
        dtype = k.dtype
        k, v = self._store(k), self._store(v)
        if rows is None and input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self._load(self.k[:, :, :end], dtype), self._load(self.v[:, :, :end], dtype)
        B, T = k.shape[0], k.shape[2]
        rows = torch.arange(B, device=k.device) if rows is None else rows
        pos = input_pos.expand(B, T)
        self.k[rows[:, None], :, pos] = k.transpose(1, 2)  # indexed view: (B, T, n_kv_heads, row)
        self.v[rows[:, None], :, pos] = v.transpose(1, 2)
        return self._load(self.k[rows, :, :end], dtype), self._load(self.v[rows, :, :end], dtype)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight, over the last dimension, in fp32 (Llama 4's q/k norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Sinks(nn.Module):
    """gpt-oss's attention sinks: a learned logit per head, `weight` (n_heads,), that joins each query's
    softmax over the keys and takes its share of it to no value."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_heads))


def attend_with_sinks(q, k, v, sinks: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, kvH, S, D) whose softmax also holds each head's sink logit;
    mask: boolean (T, S) or (B, 1, T, S), or None for causal from position 0."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return (probs @ v.float()).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # gpt-oss: sinks, and a sliding window on every other layer
        self.sinks = Sinks(cfg.n_heads) if cfg.attention_sinks else None
        self.window = cfg.sliding_window if cfg.window_layer(index) else 0
        # Llama 4: RoPE, chunks and L2 norms on three layers of four; temperature tuning on the fourth
        self.rope = cfg.rope_layer(index)
        self.chunk = cfg.attention_chunk if self.rope else 0
        self.l2_eps = cfg.norm_eps if cfg.qk_l2_norm and self.rope else None
        self.temperature = (cfg.attn_temp_floor, cfg.attn_temp_scale) if cfg.attn_temp_floor and not self.rope else None
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        # Qwen3: each head's q and k normalized (over head_dim) before RoPE
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.cache: KVCache | None = None

    @property
    def span(self) -> tuple[str, int] | None:
        """The part of the context this layer attends to: ("chunk", n) or ("window", n); None: all of it."""
        return ("chunk", self.chunk) if self.chunk else ("window", self.window) if self.window else None

    def forward(self, x: torch.Tensor, rot: torch.Tensor, input_pos: torch.Tensor | None,
                mask: torch.Tensor | None, end: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, rot), apply_rope(k, rot)
        if self.l2_eps is not None:
            q, k = l2_norm(q, self.l2_eps), l2_norm(k, self.l2_eps)
        if self.temperature is not None:
            floor, scale = self.temperature
            pos = torch.arange(T, device=x.device) if input_pos is None else input_pos
            q = q * (torch.log1p(torch.floor((pos.float() + 1.0) / floor)) * scale + 1.0)[..., None, None].to(q.dtype)
        if isinstance(mask, dict):  # the causal mask (key None) and the chunked or windowed layers' ones: this layer's
            mask = mask.get(self.span)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if input_pos is not None:
            k, v = self.cache.update(input_pos, k, v, end, rows)  # (B, n_kv_heads, end, head_dim)
        if self.sinks is not None:
            out = attend_with_sinks(q, k, v, self.sinks.weight, mask)
        elif input_pos is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, attn_mask=mask, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ExpertLinear(nn.Module):
    """One linear layer of every expert: weight (n_experts, out_features, in_features); forward(x, e) is
    expert e's x @ weight[e].T."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(n_experts, out_features)) if bias else None

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return F.linear(x, self.weight[e], None if self.bias is None else self.bias[e])


class Experts(nn.Module):
    """The experts of a mixture, each a SwiGLU feed-forward: w1 (gate), w3 (up) and w2 (down). forward adds
    each row's chosen experts' outputs, weighted; rows are grouped by expert, so each expert's weights
    are read once for all the rows that chose it."""

    def __init__(self, n_experts: int, dim: int, hidden: int, bias: bool = False, limit: float = 0.0,
                 alpha: float = 1.702):
        super().__init__()
        self.w1 = ExpertLinear(n_experts, dim, hidden, bias)
        self.w2 = ExpertLinear(n_experts, hidden, dim, bias)
        self.w3 = ExpertLinear(n_experts, dim, hidden, bias)
        self.weight_input = False  # set by MoEFeedForward (Llama 4)
        self.limit, self.alpha = limit, alpha  # gpt-oss's clamped SwiGLU where limit > 0

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if not self.limit:
            return F.silu(gate) * up
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(self.alpha * gate)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (N, dim), each row's chosen experts' ids (N, k) and weights (N, k) -> (N, dim)."""
        out = torch.zeros_like(x)
        for e, rows, w in by_expert(ids, weights):
            h = x[rows]
            if self.weight_input:  # Llama 4: the weight scales the expert's input
                h = h * w[:, None].to(h.dtype)
            y = self.w2(self.act(self.w1(h, e), self.w3(h, e)), e)
            out.index_add_(0, rows, y if self.weight_input else y * w[:, None].to(y.dtype))
        return out


def by_expert(ids: torch.Tensor, weights: torch.Tensor):
    """(expert, its rows, their weights) for each expert some row chose, in expert order."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n:
            chosen = order[start:start + n]
            yield e, chosen // k, weights.reshape(-1)[chosen]
        start += n


def route(logits: torch.Tensor, k: int, router: str, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's logits (N, E) -> the k chosen experts' weights (N, k) fp32 and ids (N, k). softmax: the
    softmax over all experts, of the k largest; sigmoid: the sigmoid of the k largest logits. `norm`: the
    chosen weights rescaled to sum to 1. Ties go to the lower expert id (torch.topk takes either, and the
    kernels' decode step takes the lower), by a stable sort."""
    logits = logits.float()
    scores = logits if router == "sigmoid" else logits.softmax(dim=-1)
    top, ids = (t[..., :k] for t in scores.sort(dim=-1, descending=True, stable=True))
    weights = torch.sigmoid(top) if router == "sigmoid" else top
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoEFeedForward(nn.Module):
    """A mixture of experts in place of the feed-forward: a router (`gate`, dim -> n_experts) chooses
    n_experts_used experts a token (model.config's expert_router, expert_norm), whose outputs add up
    weighted; plus, where the family has one, a shared expert every token goes through (`shared`), its
    output scaled by sigmoid(shared_gate(x)) where that gate exists (Qwen2-MoE)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.router, self.norm = cfg.n_experts_used, cfg.expert_router, cfg.expert_norm
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=cfg.router_bias)
        self.experts = Experts(cfg.n_experts, cfg.dim, cfg.expert_hidden_dim, cfg.expert_bias, cfg.swiglu_limit,
                               cfg.swiglu_alpha)
        self.experts.weight_input = cfg.expert_weight_input
        self.shared = FeedForward(cfg, cfg.shared_expert_dim) if cfg.shared_expert_dim else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        weights, ids = route(self.gate(x2), self.k, self.router, self.norm)
        out = self.experts(x2, weights, ids)
        if self.shared is not None:
            shared = self.shared(x2)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x2)) * shared
            out = out + shared
        return out.view(x.shape)


# Each linear layer of a block, by its Meta name, and the block module that holds it (what LoRA wraps).
LINEAR_PARENTS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention", "w1": "feed_forward",
                  "w2": "feed_forward", "w3": "feed_forward"}


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.attention = Attention(cfg, index)
        self.feed_forward = MoEFeedForward(cfg) if cfg.moe_layer(index) else FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rot, input_pos, mask, end, rows=None):
        h = x + self.attention(self.attention_norm(x), rot, input_pos, mask, end, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.rope_magnitude = rope_magnitude(cfg.rope_scaling)
        self.max_seq_len = 0  # capacity of the KV caches; 0 until setup_caches
        self.cache_batch = 0  # rows of the KV caches
        self.checkpointing = False  # recompute each layer's activations in backward (training memory)
        self.cache_tokens: list[int] = []  # token ids whose keys/values the caches hold (kept by generate)
        self.kv_type: str | None = None  # what setup_caches allocates by default (KV_TYPES; None: the model's dtype)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # always a dense parameter, whatever the linear layers hold

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: "torch.dtype | str | None" = None) -> None:
        """Allocate static KV caches; positions 0..max_seq_len-1 can then be decoded. Their type: `dtype`
        (a torch dtype or a name of KV_TYPES), else the model's `kv_type`, else the model's dtype."""
        if max_seq_len > self.config.context_length:
            raise ValueError(f"{max_seq_len} positions exceed the model's context of {self.config.context_length}")
        dtype = dtype or getattr(self, "kv_type", None) or self.norm.weight.dtype
        device = self.device
        for layer in self.layers:
            layer.attention.cache = KVCache(max_batch_size, self.config.n_kv_heads, max_seq_len,
                                            self.config.head_dim, dtype, device)
        self.max_seq_len, self.cache_batch = max_seq_len, max_batch_size
        self.cache_tokens = []

    def shift_caches(self, keep: int, discard: int, end: int, row: int = 0) -> None:
        """Context shift of cache row `row`, filled up to position `end`: its first `keep` positions stay,
        the next `discard` go, the rest move down (KVCache.shift). The caller updates `cache_tokens`."""
        if not 0 < discard <= end - keep:
            raise ValueError(f"cannot discard {discard} of the {end - keep} cached positions after the first {keep}")
        angles = -float(discard) * self.inv_freq.to(self.device)
        rot = torch.polar(torch.ones_like(angles), angles)
        with torch.inference_mode():
            for layer in self.layers:  # (the keys of layers without RoPE were never turned)
                layer.attention.cache.shift(row, keep, discard, end, rot if layer.attention.rope else torch.ones_like(rot))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                last_only: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) (or (B, 1, vocab) with last_only).

        Without input_pos: a causal forward from position 0, no cache (training, scoring).
        With input_pos: the consecutive absolute positions of these tokens, (T,) shared by the batch
        or (B, T) per row; keys and values go into the caches set up by setup_caches, in cache rows
        `rows` (B,) (default 0..B-1), and attention sees everything cached before them. Per-row
        positions and rows let requests of different lengths decode together in one batch.
        """
        B, T = tokens.shape
        compiling = torch.compiler.is_compiling()
        if input_pos is None:
            positions, end = torch.arange(T, device=tokens.device), T
            if T > self.config.context_length:
                raise ValueError(f"{T} tokens exceed the model's context of {self.config.context_length}")
        else:
            if self.max_seq_len == 0:
                raise RuntimeError("call setup_caches() before a forward with input_pos")
            # Attend over the cache up to the last position; a compiled graph cannot read that value
            # and attends over the whole cache, the mask hiding what is not written yet.
            end = self.max_seq_len if compiling else int(input_pos.max()) + 1
            positions = input_pos
            if end > self.max_seq_len:
                raise ValueError(f"position {end - 1} is beyond the KV cache of {self.max_seq_len} positions")
        rot = rope_rotations(positions, self.inv_freq, self.rope_magnitude)  # (T, head_dim/2) or (B, T, head_dim/2)
        mask = None
        if input_pos is not None and (T > 1 or compiling or input_pos.dim() == 2):
            # With a cache, query t sits at absolute position input_pos[t] and may attend to every
            # cached position up to and including its own: a causal mask shifted by the cache offset.
            # (A single eager query at a position shared by the batch attends to exactly the cache up
            # to `end`: no mask needed.)
            mask = torch.arange(end, device=tokens.device) <= input_pos[..., None]  # (T, end) or (B, T, end)
            if mask.dim() == 3:
                mask = mask[:, None]  # (B, 1, T, end): the same for every head
        mask = self.spans(mask, positions, end)
        x = self.run_layers(self.tok_embeddings(tokens), rot, input_pos, mask, end, rows)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> the last hidden state (B, T, dim), after the final norm: a causal forward from
        position 0 without the caches or the output layer, what embeddings pool."""
        T = tokens.shape[1]
        if T > self.config.context_length:
            raise ValueError(f"{T} tokens exceed the model's context of {self.config.context_length}")
        positions = torch.arange(T, device=tokens.device)
        x = self.run_layers(self.tok_embeddings(tokens), rope_rotations(positions, self.inv_freq, self.rope_magnitude),
                            None, self.spans(None, positions, T), T, None)
        return self.norm(x)

    def spans(self, mask: torch.Tensor | None, positions: torch.Tensor, end: int):
        """`mask` as it is, or {None: mask, span: that span's mask} where some layers attend to a part of the
        context (Attention.span) and the positions reach past it: within chunks (Llama 4), key position j is
        seen from query position p where j <= p and j // n == p // n; within a window (gpt-oss), where
        p - n < j <= p."""
        spans = {layer.attention.span for layer in self.layers} - {None}
        if not spans or all(end <= n for _, n in spans):
            return mask
        keys, p = torch.arange(end, device=positions.device), positions[..., None]
        out = {None: mask}
        for kind, n in spans:
            inside = (keys <= p) & (keys >= (p // n * n if kind == "chunk" else p - n + 1))
            out[(kind, n)] = inside[:, None] if inside.dim() == 3 else inside
        return out

    def run_layers(self, x, rot, input_pos, mask, end, rows):
        """The blocks in order (a kernel-backed model runs a one-token step of all of them as one op)."""
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, rot, input_pos, mask, end, rows, use_reentrant=False)
            else:
                x = layer(x, rot, input_pos, mask, end, rows)
        return x

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random initialisation for pretraining: normal(0, std), residual projections scaled down."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            else:
                residual = name.endswith(("wo.weight", "w2.weight"))  # experts.w2.weight too
                s = std / math.sqrt(2 * self.config.n_layers) if residual else std
                with torch.no_grad():
                    p.normal_(0.0, s, generator=generator)


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss; logits (B, T, V) and targets (B, T) already shifted by the caller."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
