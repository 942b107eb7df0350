"""The model's configuration as data: one dataclass, the families it runs, and a literal table of presets.
Each file format's reader of it sits with that format (formats/gguf.py, hf.py, meta.py); a training
run's configuration is train/config.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE: Llama 3.1's (kind "llama3": meta-llama/llama-models, `apply_scaling`) or
    YaRN (kind "yarn", Peng et al. 2023: gpt-oss; beta_fast, beta_slow and truncate are its alone)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192
    kind: str = "llama3"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclass
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # None: derived from dim as Meta's FeedForward does
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    context_length: int = 2048
    tie_embeddings: bool = False
    head_dim: int | None = None  # None: dim // n_heads
    # The LLaMA lineage's variations, as data (the model file reads them; the loaders and writers of each
    # format name the family's tensors and keys after `family`):
    family: str = "llama"  # llama (LLaMA 1-3, Mistral, SmolLM), llama4, qwen2 (Qwen2, Qwen2.5), qwen3, phi3
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2, gpt-oss)
    o_bias: bool = False  # a bias on the attention's output projection (gpt-oss)
    attention_sinks: bool = False  # a learned logit per head that takes a share of the softmax (gpt-oss)
    # every sliding_window_pattern-th layer attends to everything, the others to the last sliding_window positions
    # (gpt-oss: 128 and 2); 0: every layer to everything
    sliding_window: int = 0
    sliding_window_pattern: int = 0
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    # A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) in place of the feed-forward, where n_experts > 0:
    n_experts: int = 0
    n_experts_used: int = 0  # how many experts a token goes through (top-k)
    expert_hidden_dim: int | None = None  # each expert's hidden size; None: hidden_dim
    expert_router: str = "softmax"  # the chosen experts' weights: "softmax" over all, or "sigmoid" of their logits
    expert_norm: bool = True  # the chosen weights rescaled to sum to 1 (Mixtral; Qwen-MoE's norm_topk_prob)
    shared_expert_dim: int = 0  # a dense feed-forward every token also goes through (Qwen2-MoE), 0: none
    shared_expert_gate: bool = False  # that one's output scaled by sigmoid(a learned gate of the input) (Qwen2-MoE)
    dense_layers: tuple[int, ...] = ()  # the layers of an MoE model that keep a dense feed-forward of hidden_dim
    expert_weight_input: bool = False  # the router's weight scales an expert's input, not its output (Llama 4)
    router_bias: bool = False  # biases on the router and on each expert's projections (gpt-oss)
    expert_bias: bool = False
    swiglu_limit: float = 0.0  # gpt-oss's clamped SwiGLU: (clamp(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
    swiglu_alpha: float = 1.702
    # Llama 4's attention: every nope_layer_step-th layer without RoPE (global), the others attending within
    # chunks of attention_chunk positions; q and k of the RoPE layers L2-normed (a weightless RMSNorm) after
    # RoPE; and q of the other layers scaled by log1p(floor((pos + 1) / attn_temp_floor)) * attn_temp_scale + 1
    nope_layer_step: int = 0  # 0: RoPE on every layer
    attention_chunk: int = 0  # 0: no chunks
    qk_l2_norm: bool = False
    attn_temp_floor: int = 0  # 0: no temperature tuning
    attn_temp_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            # Meta's llama/model.py: 2/3 of 4*dim, scaled, rounded up to a multiple.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if isinstance(self.rope_scaling, Mapping):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.rope_scaling is not None and self.rope_scaling.kind not in ("llama3", "yarn"):
            raise ValueError(f"unknown RoPE scaling {self.rope_scaling.kind!r}; known: llama3, yarn")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        self.dense_layers = tuple(int(i) for i in self.dense_layers)
        if self.n_experts:
            if self.expert_hidden_dim is None:
                self.expert_hidden_dim = self.hidden_dim
            if not 0 < self.n_experts_used <= self.n_experts:
                raise ValueError(f"n_experts_used ({self.n_experts_used}) must be 1 to n_experts ({self.n_experts})")
            if self.expert_router not in ROUTERS:
                raise ValueError(f"unknown expert_router {self.expert_router!r}; known: {', '.join(ROUTERS)}")

    def window_layer(self, i: int) -> bool:
        """Whether layer i attends to the last sliding_window positions only (gpt-oss's even layers)."""
        return bool(self.sliding_window) and (not self.sliding_window_pattern or (i + 1) % self.sliding_window_pattern != 0)

    def rope_layer(self, i: int) -> bool:
        """Whether layer i rotates q and k (RoPE); the others are Llama 4's global NoPE layers."""
        return not self.nope_layer_step or (i + 1) % self.nope_layer_step != 0

    def moe_layer(self, i: int) -> bool:
        """Whether layer i's feed-forward is a mixture of experts."""
        return self.n_experts > 0 and i not in self.dense_layers

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active): the weights the model holds, and those one token reads (the chosen experts'
        only), embeddings and output layer included (tied: once)."""
        qkv = self.dim * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        attn = qkv + self.n_heads * self.head_dim * self.dim + 2 * self.dim
        attn += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim if self.qkv_bias else 0
        attn += self.dim if self.o_bias else 0
        attn += self.n_heads if self.attention_sinks else 0
        attn += 2 * self.head_dim if self.qk_norm else 0  # (Llama 4's L2 norms have no weights)
        total = active = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2) + self.dim
        for i in range(self.n_layers):
            total, active = total + attn, active + attn
            if not self.moe_layer(i):
                total, active = total + 3 * self.dim * self.hidden_dim, active + 3 * self.dim * self.hidden_dim
                continue
            shared = 3 * self.dim * self.shared_expert_dim + (self.dim if self.shared_expert_gate else 0)
            expert = 3 * self.dim * self.expert_hidden_dim + (2 * self.expert_hidden_dim + self.dim) * self.expert_bias
            router = (self.dim + self.router_bias) * self.n_experts
            total += router + shared + self.n_experts * expert
            active += router + shared + self.n_experts_used * expert
        return total, active

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FAMILIES = ("llama", "llama4", "qwen2", "qwen3", "phi3", "gpt-oss")
ROUTERS = ("softmax", "sigmoid")
# Hugging Face model_type -> family; Mistral is a Llama with other sizes (and, in v0.1, a sliding window), Mixtral a
# Mistral with experts; the Qwen MoE models are their dense family's attention with experts.
HF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "mixtral": "llama", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "llama4_text": "llama4", "llama4": "llama4",
               "gpt_oss": "gpt-oss"}
# GGUF general.architecture -> family (Mistral's and Mixtral's GGUF files say "llama")
GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "qwen2moe": "qwen2",
                 "qwen3moe": "qwen3", "llama4": "llama4", "gpt-oss": "gpt-oss"}

_LLAMA31_ROPE = dict(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), rope_theta=500000.0, context_length=131072)
_LLAMA3_VOCAB = dict(vocab_size=128256, rope_theta=500000.0, context_length=8192)

_LLAMA4 = dict(n_experts_used=1, expert_hidden_dim=8192, expert_router="sigmoid", expert_norm=False,
               expert_weight_input=True, shared_expert_dim=8192, nope_layer_step=4, attention_chunk=8192,
               attn_temp_floor=8192, attn_temp_scale=0.1)

_GPT_OSS = dict(family="gpt-oss", dim=2880, n_heads=64, n_kv_heads=8, head_dim=64, hidden_dim=2880, vocab_size=201088,
                qkv_bias=True, o_bias=True, attention_sinks=True, sliding_window=128, sliding_window_pattern=2,
                rope_theta=150000.0, rope_scaling=RopeScaling(32.0, original_context=4096, kind="yarn", truncate=False),
                context_length=131072, n_experts_used=4, expert_hidden_dim=2880, router_bias=True, expert_bias=True,
                swiglu_limit=7.0)

# Presets: overrides of ModelConfig's defaults; each comment names the published size and source.
PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA (Touvron et al. 2023, table 2; Meta params.json): 6.7B, 13.0B, 32.5B, 65.2B
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40),
    "llama-33b": dict(dim=6656, n_layers=60, n_heads=52),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64),
    # Llama 2 (Touvron et al. 2023b; Meta params.json): 6.7B, 13.0B, 69.0B
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, context_length=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, context_length=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096, context_length=4096),
    # Llama 3 (meta-llama/llama3 params.json): 8.0B, 70.6B
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                      multiple_of=1024, **_LLAMA3_VOCAB),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096, **_LLAMA3_VOCAB),
    # Llama 3.1 (Llama Team 2024, table 3; HF config.json): 8.0B, 70.6B, 405.9B
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                        vocab_size=128256, **_LLAMA31_ROPE),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                         vocab_size=128256, **_LLAMA31_ROPE),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, hidden_dim=53248,
                          vocab_size=128256, **_LLAMA31_ROPE),
    # Llama 3.2 (HF config.json, tied embeddings): 1.24B, 3.21B
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                        tie_embeddings=True, rope_theta=500000.0, context_length=131072,
                        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                        tie_embeddings=True, rope_theta=500000.0, context_length=131072,
                        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
    # SmolLM2 (HuggingFaceTB config.json, LLaMA architecture, tied): 134.5M, 361.8M, 1.71B
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                         tie_embeddings=True, rope_theta=100000.0, context_length=8192),
    "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, vocab_size=49152,
                         tie_embeddings=True, rope_theta=100000.0, context_length=8192),
    "smollm2-1.7b": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, vocab_size=49152,
                         tie_embeddings=True, rope_theta=130000.0, context_length=8192),
    # Mistral 7B v0.3 (mistralai config.json; the llama architecture): 7.25B
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32768,
                       rope_theta=1000000.0, context_length=32768),
    # Qwen2.5 (Qwen config.json; q/k/v biases): 0.49B, 1.54B, 7.62B
    "qwen2.5-0.5b": dict(family="qwen2", qkv_bias=True, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         hidden_dim=4864, vocab_size=151936, tie_embeddings=True, norm_eps=1e-6,
                         rope_theta=1000000.0, context_length=32768),
    "qwen2.5-1.5b": dict(family="qwen2", qkv_bias=True, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                         hidden_dim=8960, vocab_size=151936, tie_embeddings=True, norm_eps=1e-6,
                         rope_theta=1000000.0, context_length=32768),
    "qwen2.5-7b": dict(family="qwen2", qkv_bias=True, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                       hidden_dim=18944, vocab_size=152064, norm_eps=1e-6, rope_theta=1000000.0, context_length=32768),
    # Qwen3 (Qwen config.json; q/k RMSNorm, head_dim 128): 0.60B, 1.72B, 4.02B, 8.19B
    "qwen3-0.6b": dict(family="qwen3", qk_norm=True, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       hidden_dim=3072, vocab_size=151936, tie_embeddings=True, norm_eps=1e-6,
                       rope_theta=1000000.0, context_length=40960),
    "qwen3-1.7b": dict(family="qwen3", qk_norm=True, dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       hidden_dim=6144, vocab_size=151936, tie_embeddings=True, norm_eps=1e-6,
                       rope_theta=1000000.0, context_length=40960),
    "qwen3-4b": dict(family="qwen3", qk_norm=True, dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     hidden_dim=9728, vocab_size=151936, tie_embeddings=True, norm_eps=1e-6,
                     rope_theta=1000000.0, context_length=40960),
    "qwen3-8b": dict(family="qwen3", qk_norm=True, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     hidden_dim=12288, vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, context_length=40960),
    # Phi-3-mini-4k (microsoft config.json; fused projections, split at load): 3.82B. Its 2047-token
    # sliding window bounds the context llamalite runs it at (config_from_hf).
    "phi3-mini-4k": dict(family="phi3", dim=3072, n_layers=32, n_heads=32, hidden_dim=8192, vocab_size=32064,
                         context_length=2047),
    # Mixtures of experts (total / active). Mixtral 8x7B (mistralai config.json; Jiang et al. 2024: 47B / 13B):
    # 46.7B / 12.9B
    "mixtral-8x7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32000,
                         rope_theta=1000000.0, context_length=32768, n_experts=8, n_experts_used=2),
    # Qwen3-MoE (Qwen config.json; model cards: 30.5B / 3.3B, 235B / 22B)
    "qwen3-30b-a3b": dict(family="qwen3", qk_norm=True, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                          hidden_dim=6144, vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0,
                          context_length=40960, n_experts=128, n_experts_used=8, expert_hidden_dim=768),
    "qwen3-235b-a22b": dict(family="qwen3", qk_norm=True, dim=4096, n_layers=94, n_heads=64, n_kv_heads=4,
                            head_dim=128, hidden_dim=12288, vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0,
                            context_length=40960, n_experts=128, n_experts_used=8, expert_hidden_dim=1536),
    # Llama 4 (meta-llama config.json, the text model; Meta: Scout 109B / 17B, Maverick 400B / 17B, both with the
    # vision encoder): 107.8B / 17.2B, 400.7B / 17.2B
    "llama4-scout": dict(family="llama4", dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128,
                         hidden_dim=16384, vocab_size=202048, rope_theta=500000.0, context_length=10485760,
                         rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192), **_LLAMA4, n_experts=16, qk_l2_norm=True),
    "llama4-maverick": dict(family="llama4", dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128,
                            hidden_dim=16384, vocab_size=202048, rope_theta=500000.0, context_length=1048576,
                            **_LLAMA4, n_experts=128, dense_layers=tuple(range(0, 48, 2))),
    # gpt-oss (openai config.json; model card: 20.9B / 3.6B, 116.8B / 5.1B)
    "gpt-oss-20b": dict(n_layers=24, n_experts=32, **_GPT_OSS),
    "gpt-oss-120b": dict(n_layers=36, n_experts=128, **_GPT_OSS),
    # Qwen1.5-MoE-A2.7B (Qwen config.json, the qwen2_moe architecture; model card: 14.3B / 2.7B)
    "qwen1.5-moe-a2.7b": dict(family="qwen2", qkv_bias=True, dim=2048, n_layers=24, n_heads=16, hidden_dim=5632,
                              vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, context_length=8192,
                              n_experts=60, n_experts_used=4, expert_hidden_dim=1408, expert_norm=False,
                              shared_expert_dim=5632, shared_expert_gate=True),
}


