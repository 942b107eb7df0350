"""Layers backed by llamalite's compiled CPU kernels (llamalite/kernels/cpu.cpp), swapped in by the
loader with the call signatures of the modules they replace, so model.py never knows.

`QuantLinear` (nn.Linear's signature) and `QuantEmbedding` (nn.Embedding's) keep GGUF blocks as they
are in the file. With the compiled kernels, each row's blocks are repacked once at load into the
kernels' structure-of-arrays layout (same bytes, same size). Small batches (decode) go through the
fused kernel (int16 activations, exact integer block dot products); larger ones (prefill) through the
kernels' int16 GEMM where the CPU has AVX-512 VNNI, else through fp32 GEMM on dequantized tiles. `FastRMSNorm`,
`FastAttention` and `FastFeedForward` run the model's own math with fewer, fused calls on the
one-token decode step. Without the compiled kernels, or off the CPU, everything runs through
PyTorch's own ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import adapted
from ..kernels.blocks import BLOCK, dequantize as dequantize_reference
from ..kernels.ops import KERNEL_TYPES, kernels_available, register_fake, simd_path
from ..model.transformer import (Attention, Experts, FeedForward, MoEFeedForward, RMSNorm, Transformer,
                                 TransformerBlock, rope_rotations)

# Without the int16 GEMM (no AVX-512 VNNI), more rows than GEMV_MAX_ROWS of these run on the dot
# products, eight rows a pass, not fp32 tiles: Q6_K's tiles were 1.15x faster on a 128-token SmolLM2
# prefill but 2-3x slower at 7B (a 32-token prompt: 180 MB of fp32 written and read a down projection).
DOT_ONLY_TYPES = ("Q6_K",)
# Lossy block types without a kernel of their own: re-quantized to Q8_0 at load to run on its kernel
# (8-bit blocks on top of a 5-bit format add little error; fp32 would be 4x the memory and slower).
# Q5_0 is not among them: its values are Q8_0 values of the same scale, converted exactly at load.
# MXFP4 (gpt-oss's experts) takes twice its bytes so, until it has a kernel of its own.
REQUANT_TYPES = ("Q5_1", "Q5_K", "MXFP4")
GEMV_MAX_ROWS = 8  # up to this many activation rows use the fused dot-product kernel
GEMM_TILE_BYTES = 4 << 20  # without the int16 GEMM, prefill dequantizes this much fp32 weight at a time
QGEMM: bool | None = None  # whether more rows go to the int16 GEMM kernel (AVX-512 VNNI), set on first use

def _qgemm() -> bool:
    """Whether products of more than GEMV_MAX_ROWS rows run on the kernels' int16 GEMM (AVX-512 VNNI:
    twice fp32 GEMM's rate here, weights unpacked once per tile for all rows); else on fp32 GEMM over
    dequantized tiles."""
    global QGEMM
    if QGEMM is None:
        QGEMM = simd_path() == "avx512vnni"
    return QGEMM




def pack(raw: torch.Tensor, type_name: str, in_place: bool = False) -> tuple[torch.Tensor, bool]:
    """GGUF rows -> (the rows the kernels read, whether they are repacked). In place when the caller
    owns `raw` (the loader's copy-on-write map of the file): no second copy of the weights."""
    if raw.device.type == "cpu" and type_name in KERNEL_TYPES and kernels_available():
        if in_place and raw.is_contiguous():
            torch.ops.llamalite.repack_(raw, KERNEL_TYPES[type_name])
            return raw, True
        return torch.ops.llamalite.repack(raw, KERNEL_TYPES[type_name]), True
    return raw, False


def requantize_q8_0(data, type_name: str, shape: tuple[int, int], chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """Raw GGUF blocks of a (N, K) tensor -> Q8_0 rows in the kernels' packed layout (needs the compiled
    kernels), through fp32 a few thousand rows at a time: the whole tensor in fp32 (a 49k-token
    embedding: 113 MB, and as much again in the dequantization's temporaries) never exists at once."""
    rows, k = shape
    raw = torch.as_tensor(data).reshape(rows, -1)
    out = torch.empty(rows, k // 32 * 34, dtype=torch.uint8)
    step = max(1, chunk_bytes // (4 * k))
    for r in range(0, rows, step):
        part = dequantize_reference(raw[r:r + step], type_name, (min(step, rows - r), k))
        out[r:r + step] = torch.ops.llamalite.quantize_q8_0(part)
    return out


def dequantize_rows(raw: torch.Tensor, type_name: str, packed: bool) -> torch.Tensor:
    """(N, bytes) blocks, repacked or in GGUF order -> (N, K) fp32."""
    if packed:
        return torch.ops.llamalite.dequantize(raw, KERNEL_TYPES[type_name])
    n_el, n_bytes = BLOCK[type_name]
    return dequantize_reference(raw, type_name, (raw.shape[0], raw.shape[1] // n_bytes * n_el)).to(raw.device)


class QuantLinear(nn.Module):
    """y = x @ W.T with W held as GGUF blocks (out_features rows of in_features/32 blocks)."""

    def __init__(self, raw: torch.Tensor, type_name: str, in_features: int, in_place: bool = False,
                 packed: bool = False):
        super().__init__()
        n_el, n_bytes = BLOCK[type_name]
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] * n_el != in_features * n_bytes:
            raise ValueError(f"{type_name} blocks of shape {tuple(raw.shape)} do not hold rows of {in_features}")
        raw, self.packed = (raw, True) if packed else pack(raw, type_name, in_place)
        self.register_buffer("raw", raw)
        self.type_name, self.in_features, self.out_features = type_name, in_features, raw.shape[0]
        self.bias: nn.Parameter | None = None  # dense, added after the product (Qwen2's q/k/v)
        register_fake()

    @classmethod
    def sharing(cls, other: "QuantEmbedding") -> "QuantLinear":
        """The output layer of a model with tied embeddings: the same blocks, not a copy."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.register_buffer("raw", other.raw)
        layer.packed, layer.type_name, layer.bias = other.packed, other.type_name, None
        layer.in_features, layer.out_features = other.embedding_dim, other.num_embeddings
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x, self.raw)
        return y if self.bias is None else y + self.bias

    def product(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """x @ W.T for W the rows of blocks `raw` (these rows, or some of them)."""
        lead, n = x.shape[:-1], raw.shape[0]
        x2 = x.reshape(-1, self.in_features)
        if self.packed and x.device.type == "cpu" and (
                x2.shape[0] <= GEMV_MAX_ROWS or _qgemm() or self.type_name in DOT_ONLY_TYPES):
            y = torch.ops.llamalite.qmatmul(x2, raw, KERNEL_TYPES[self.type_name])
        else:
            # Tiles of rows: dequantizing a 7B model's weights whole would write gigabytes per prefill.
            rows = max(1, GEMM_TILE_BYTES // (4 * self.in_features))
            x2 = x2.float()
            y = torch.cat([F.linear(x2, dequantize_rows(raw[i:i + rows], self.type_name, self.packed).to(x2.device))
                           for i in range(0, n, rows)], dim=1)
        return y.to(x.dtype).reshape(*lead, n)

    def dequantized(self) -> torch.Tensor:
        return dequantize_rows(self.raw, self.type_name, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}"


class QuantExpertLinear(QuantLinear):
    """model.ExpertLinear (forward(x, e): expert e's product) over GGUF blocks: the experts' rows one after
    another, n_experts * out_features rows of in_features / 32 blocks, as a file's 3-D expert tensor holds
    them; expert e's product reads only its own rows."""

    def __init__(self, raw: torch.Tensor, type_name: str, n_experts: int, in_features: int, in_place: bool = False,
                 packed: bool = False):
        super().__init__(raw, type_name, in_features, in_place, packed)
        if self.out_features % n_experts:
            raise ValueError(f"{self.out_features} rows of blocks do not split into {n_experts} experts")
        self.n_experts, self.out_features = n_experts, self.out_features // n_experts

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        y = self.product(x, self.raw[e * self.out_features:(e + 1) * self.out_features])
        return y if self.bias is None else y + self.bias[e]  # (gpt-oss's experts have biases)

    def dequantized(self) -> torch.Tensor:
        return super().dequantized().view(self.n_experts, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, " + super().extra_repr()


class FastExperts(Experts):
    """model.Experts whose products run as one kernel call (torch.ops.llamalite.experts: rows grouped by
    expert, only the chosen experts' rows read) where its three projections are packed blocks, w1 and w3
    of one type, on fp32 CPU rows; every other case runs Experts' own forward."""

    @classmethod
    def replacing(cls, experts: Experts) -> "FastExperts":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.w1, fast.w2, fast.w3 = experts.w1, experts.w2, experts.w3
        fast.weight_input, fast.limit, fast.alpha = experts.weight_input, experts.limit, experts.alpha
        projections = (fast.w1, fast.w2, fast.w3)
        fast.fused = (all(isinstance(m, QuantExpertLinear) and m.packed for m in projections)
                      and all(m.bias is None or m.bias.dtype == torch.float32 for m in projections)
                      and fast.w1.type_name == fast.w3.type_name)
        return fast

    def forward(self, x, weights, ids):
        if not self.fused or x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
            return super().forward(x, weights, ids)
        n, k = ids.shape
        if self.weight_input:  # Llama 4: each (row, expert) its own input x * weight, the outputs summed
            x, ids, weights = (x[:, None] * weights[..., None]).reshape(n * k, -1), ids.reshape(n * k, 1), \
                torch.ones(n * k, 1)
        out = torch.ops.llamalite.experts(x, ids, weights, self.w1.raw, self.w3.raw, self.w2.raw,
                                          KERNEL_TYPES[self.w1.type_name], KERNEL_TYPES[self.w2.type_name],
                                          self.w1.n_experts, 0, *self.biases(), self.limit, self.alpha)
        return out.view(n, k, -1).sum(1) if self.weight_input else out


    def biases(self) -> list[torch.Tensor | None]:
        """b1, b3, b2 as the op and the step take them (gpt-oss's; None where there are none)."""
        return [None if m.bias is None else m.bias.detach().contiguous() for m in (self.w1, self.w3, self.w2)]


class QuantEmbedding(nn.Module):
    """Rows of a GGUF-block table, dequantized only for the tokens looked up."""

    def __init__(self, raw: torch.Tensor, type_name: str, dim: int, in_place: bool = False, packed: bool = False):
        super().__init__()
        raw, self.packed = (raw, True) if packed else pack(raw, type_name, in_place)
        self.register_buffer("raw", raw)
        self.type_name, self.embedding_dim, self.num_embeddings = type_name, dim, raw.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.raw[tokens.reshape(-1)], self.type_name, self.packed)
        return rows.reshape(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.type_name}"


class FastRMSNorm(RMSNorm):
    """model.RMSNorm computed by one kernel op for fp32 CPU tensors (five eager ops otherwise)."""

    @classmethod
    def replacing(cls, norm: RMSNorm) -> "FastRMSNorm":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.eps, fast.weight = norm.eps, norm.weight
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op has no backward: anything that needs gradients (fine-tuning) takes the reference math.
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.dtype == torch.float32 and x.device.type == "cpu" and self.weight.dtype == torch.float32 and not needs_grad:
            return torch.ops.llamalite.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def fuse_rows(*layers: nn.Module) -> tuple[nn.Module, ...] | None:
    """Layers reading the same input, to be run as one kernel call (qmatmul_multi): the layers
    themselves if they are all packed QuantLinear of one type, else None. Their blocks stay put."""
    if not all(isinstance(m, QuantLinear) and m.packed and m.type_name == layers[0].type_name for m in layers):
        return None
    return layers


def _fused(layers: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    y = torch.ops.llamalite.qmatmul_multi(x, [m.raw for m in layers], KERNEL_TYPES[layers[0].type_name])
    return [part if m.bias is None else part + m.bias
            for m, part in zip(layers, y.split([m.out_features for m in layers], dim=1))]


def _fast_step(x: torch.Tensor) -> bool:
    """An eager one-token CPU fp32 step: the case the fused paths below serve."""
    return x.shape[1] == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()


class FastAttention(Attention):
    """model.Attention whose eager one-token CPU step is two kernel calls: q/k/v in one quantized
    product, then RoPE, cache write and grouped-query attention over the cache in one op. Every other
    case runs model.Attention's own forward."""

    @classmethod
    def replacing(cls, attention: Attention) -> "FastAttention":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.n_heads, fast.n_kv_heads, fast.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        fast.wq, fast.wk, fast.wv, fast.wo = attention.wq, attention.wk, attention.wv, attention.wo
        fast.q_norm, fast.k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        fast.rope, fast.chunk, fast.l2_eps, fast.temperature = (attention.rope, attention.chunk, attention.l2_eps,
                                                                attention.temperature)
        fast.sinks, fast.window = attention.sinks, attention.window
        # the op rotates every layer's q and k and attends over the whole cache: Llama 4's and gpt-oss's layers take
        # the reference
        fast.plain = (fast.rope and not fast.chunk and fast.l2_eps is None and fast.temperature is None
                      and fast.sinks is None and not fast.window)
        fast.cache = attention.cache
        fast.qkv = fuse_rows(fast.wq, fast.wk, fast.wv)
        return fast

    def forward(self, x, rot, input_pos, mask, end, rows=None):
        B = x.shape[0]
        if input_pos is None or not _fast_step(x) or not self.plain:
            return super().forward(x, rot, input_pos, mask, end, rows)
        x2 = x.reshape(B, -1)
        if self.qkv:  # one product for the three, then any LoRA adapters' updates (adapters.py)
            q, k, v = _fused(self.qkv, x2)
            q, k, v = adapted(self.wq, q, x2), adapted(self.wk, k, x2), adapted(self.wv, v, x2)
        else:
            q, k, v = self.wq(x2), self.wk(x2), self.wv(x2)
        if self.q_norm is not None:  # per head, before the op's RoPE
            q = self.q_norm(q.view(B, self.n_heads, -1)).view(B, -1)
            k = self.k_norm(k.view(B, self.n_kv_heads, -1)).view(B, -1)
        rows = torch.arange(B) if rows is None else rows
        cos_sin = torch.view_as_real(rot.reshape(-1, rot.shape[-1]))  # (B or 1, head_dim/2, 2)
        out = torch.ops.llamalite.decode_attention(q, k, v, cos_sin, self.cache.k, self.cache.v,
                                                   input_pos.reshape(-1).expand(B), rows, self.n_heads,
                                                   self.n_kv_heads)
        return self.wo(out.view(B, 1, -1))


class FastFeedForward(FeedForward):
    """model.FeedForward with gate and up projections in one quantized product on the one-token step."""

    @classmethod
    def replacing(cls, ffn: FeedForward) -> "FastFeedForward":
        fast = cls.__new__(cls)
        nn.Module.__init__(fast)
        fast.w1, fast.w2, fast.w3 = ffn.w1, ffn.w2, ffn.w3
        fast.w13 = fuse_rows(fast.w1, fast.w3)
        return fast

    def forward(self, x):
        if self.w13 is None or not _fast_step(x):
            return super().forward(x)
        x2 = x.reshape(x.shape[0], -1)
        gate, up = _fused(self.w13, x2)
        gate, up = adapted(self.w1, gate, x2), adapted(self.w3, up, x2)
        # SiLU as the kernels' DecodePlan computes it, so the two one-token steps agree on every host
        act = torch.ops.llamalite.silu_mul(torch.cat([gate, up], dim=1))
        return self.w2(act.view(x.shape[0], 1, -1))


def _fusable(block: TransformerBlock, bias: bool, head_norms: bool) -> bool:
    """Whether a DecodePlan can run this block: kernel-backed attention with q/k/v fused and wo packed, a
    feed-forward with gate/up fused and w2 packed (or a mixture of experts on the kernels: _mixture), fp32
    norms of one eps; q/k/v biases and head norms (fp32, one eps for q and k) as the model's first block
    has them or not."""
    a, f = block.attention, block.feed_forward
    biases = [getattr(m, "bias", None) for m in (a.wq, a.wk, a.wv)]
    heads = [getattr(a, "q_norm", None), getattr(a, "k_norm", None)]
    if any((t is not None) != bias for t in biases) or any((n is not None) != head_norms for n in heads):
        return False
    if head_norms and (heads[0].eps != heads[1].eps or any(n.weight.dtype != torch.float32 for n in heads)):
        return False
    ffn = _mixture(f) if isinstance(f, MoEFeedForward) else _dense_ffn(f)
    return (isinstance(a, FastAttention) and a.qkv is not None and ffn and isinstance(a.wo, QuantLinear)
            and a.wo.packed and (a.wo.bias is None or a.wo.bias.dtype == torch.float32)
            and all(t is None or t.dtype == torch.float32 for t in biases)
            and block.attention_norm.eps == block.ffn_norm.eps
            and block.attention_norm.weight.dtype == block.ffn_norm.weight.dtype == torch.float32)


def _dense_ffn(f: nn.Module) -> bool:
    return isinstance(f, FastFeedForward) and f.w13 is not None and isinstance(f.w2, QuantLinear) and f.w2.packed


def _mixture(f: "MoEFeedForward") -> bool:
    """Whether a DecodePlan runs this mixture of experts: its experts on the kernels (FastExperts.fused), its
    router packed or fp32, its shared expert (if any) a dense feed-forward it runs, its shared gate fp32."""
    return (isinstance(f.experts, FastExperts) and f.experts.fused and _table(f.gate, biased=True) is not None
            and (f.shared is None or _dense_ffn(f.shared))
            and (f.shared_gate is None or _table(f.shared_gate) is not None and _table(f.shared_gate)[1] == DENSE))


DENSE = -1  # DecodePlan's type of an fp32 weight matrix


def _table(layer: nn.Module, biased: bool = False) -> tuple[torch.Tensor, int] | None:
    """An embedding or output layer (or a router: `biased`, its bias handed over apart) as a DecodePlan reads
    it: (packed blocks, kernel type) or (fp32 weight, DENSE); None for anything else."""
    if isinstance(layer, (QuantLinear, QuantEmbedding)):
        return (layer.raw, KERNEL_TYPES[layer.type_name]) if layer.packed else None
    if type(layer) in (nn.Embedding, nn.Linear) and (biased or getattr(layer, "bias", None) is None):
        w = layer.weight
        return (w, DENSE) if w.dtype == torch.float32 and w.is_contiguous() else None
    return None


class FastTransformer(Transformer):
    """model.Transformer whose eager one-token CPU step is one kernel call (DecodePlan.step: the embedding
    rows, per block the norms, five quantized products, attention over the cache, SiLU and residuals,
    then the final norm and the output layer), with no Python or tensor op in between: Python between
    the blocks cost about 1.5 ms of a 9 ms step for the default model, and the rest of forward another
    0.5-1 ms. Every other case runs Transformer.forward."""

    @classmethod
    def replacing(cls, model: Transformer) -> "FastTransformer":
        fast = cls.__new__(cls)
        fast.__dict__.update(model.__dict__)  # the same modules, buffers and state
        fast.plan, fast._caches_of = None, None
        embed, out = _table(model.tok_embeddings), _table(model.output)
        first = model.layers[0].attention if model.layers else None
        bias = first is not None and getattr(first.wq, "bias", None) is not None
        head_norms = first is not None and getattr(first, "q_norm", None) is not None
        if model.layers and embed and out and all(_fusable(b, bias, head_norms) for b in model.layers):
            norms, weights, types, mixtures = [], [], [], []
            for i, b in enumerate(model.layers):
                a, f = b.attention, b.feed_forward
                norms += [b.attention_norm.weight, b.ffn_norm.weight]
                weights += [a.wq.raw, a.wk.raw, a.wv.raw, a.wo.raw]
                types += [KERNEL_TYPES[m.type_name] for m in (a.wq, a.wo)]
                dense = f.shared if isinstance(f, MoEFeedForward) else f  # a mixture's shared expert, or none
                if dense is None:
                    weights += [torch.empty(0, dtype=torch.uint8)] * 3
                    types += [0, 0]
                else:
                    weights += [dense.w1.raw, dense.w3.raw, dense.w2.raw]
                    types += [KERNEL_TYPES[m.type_name] for m in (dense.w1, dense.w2)]
                if isinstance(f, MoEFeedForward):
                    mixtures.append((i, f))
            a = model.layers[0].attention
            fast.plan = torch.classes.llamalite.DecodePlan(
                embed[0], embed[1], model.inv_freq, norms, weights, types, model.layers[0].attention_norm.eps,
                model.norm.weight, model.norm.eps, out[0], out[1], a.n_heads, a.n_kv_heads)
            for i, f in mixtures:
                e = f.experts
                gate = f.shared_gate.weight.detach().reshape(-1) if f.shared_gate is not None else torch.empty(0)
                fast.plan.set_moe(i, *_table(f.gate, biased=True), e.w1.raw, e.w3.raw, e.w2.raw, KERNEL_TYPES[e.w1.type_name],
                                  KERNEL_TYPES[e.w2.type_name], f.k, f.router == "sigmoid", f.norm, gate)
                if e.weight_input:
                    fast.plan.set_weight_input(i, True)
            for i, b in enumerate(model.layers):  # Llama 4's and gpt-oss's attention variations, gpt-oss's biases
                a, f = b.attention, b.feed_forward
                empty = torch.empty(0)
                vec = lambda t: empty if t is None else t.detach().float().contiguous().reshape(-1)  # noqa: E731
                if isinstance(f, MoEFeedForward):
                    b1, b3, b2 = f.experts.biases()
                    fast.plan.set_expert_extras(i, vec(a.wo.bias), vec(f.gate.bias), vec(b1), vec(b3), vec(b2),
                                                f.experts.limit, f.experts.alpha)
                elif a.wo.bias is not None:
                    fast.plan.set_expert_extras(i, vec(a.wo.bias), empty, empty, empty, empty, 0.0, 1.702)
                if not a.plain:
                    floor, scale = a.temperature or (0, 0.0)
                    sinks = a.sinks.weight.detach() if a.sinks is not None else torch.empty(0)
                    fast.plan.set_attention(i, a.rope, -1.0 if a.l2_eps is None else a.l2_eps, floor, scale, a.chunk,
                                            a.window, sinks)
            if bias or head_norms:  # Qwen2's q/k/v biases, Qwen3's head norms
                biases = [m.bias.detach() for b in model.layers for m in (b.attention.wq, b.attention.wk, b.attention.wv)
                          ] if bias else []
                heads = [n.weight.detach() for b in model.layers for n in (b.attention.q_norm, b.attention.k_norm)
                         ] if head_norms else []
                fast.plan.set_extras(biases, heads, first.q_norm.eps if head_norms else 0.0)
        return fast

    def _plan_ready(self, plan=None) -> bool:
        """Whether the plan (or a pipeline stage's, `plan`) can run on the current caches (handed to it
        again after setup_caches)."""
        first = self.layers[0].attention.cache
        if first is None:
            return False
        if self._caches_of is not first:
            caches = [layer.attention.cache for layer in self.layers]
            plan = self.plan if plan is None else plan
            plan.set_caches([t for c in caches for t in (c.k, c.v)])
            # RoPE's rotations for every cached position, as Transformer.forward computes them, so the step
            # rotates by the same values as the layers on every host (DecodePlan::set_rope says why).
            rotations = rope_rotations(torch.arange(self.max_seq_len), self.inv_freq, self.rope_magnitude)
            plan.set_rope(torch.view_as_real(rotations).contiguous())
            self._caches_of = first
        return True

    def forward(self, tokens, input_pos=None, last_only=False, rows=None):
        if (self.plan is None or input_pos is None or tokens.shape[1] != 1 or tokens.device.type != "cpu"
                or self.max_seq_len == 0 or torch.compiler.is_compiling() or torch.is_grad_enabled() and self.training
                or not self._plan_ready()):
            return super().forward(tokens, input_pos, last_only, rows)
        B = tokens.shape[0]
        pos = input_pos.reshape(-1).expand(B)
        if int(pos.max()) >= self.max_seq_len:  # the reference raises the usual error
            return super().forward(tokens, input_pos, last_only, rows)
        rows = torch.arange(B) if rows is None else rows
        adapters = getattr(self, "adapters", None)  # adapters.AdapterSet: LoRA added inside the step
        which = adapters.rows_for(B) if adapters is not None else None
        if which is not None:
            logits = self.plan.step_adapted(tokens.reshape(-1), pos, rows, which)
        else:
            logits = self.plan.step(tokens.reshape(-1), pos, rows)
        return logits.view(B, 1, -1)


def use_kernels(model: nn.Module) -> nn.Module:
    """Swap the model's RMSNorm and Attention layers for their kernel-backed twins (same math, same
    parameters) where the compiled kernels are available."""
    if not kernels_available():
        return model
    register_fake()
    for name, module in list(model.named_modules()):
        parent, _, attr = name.rpartition(".")
        if type(module) is RMSNorm:
            setattr(model.get_submodule(parent), attr, FastRMSNorm.replacing(module))
        elif type(module) is Attention:
            setattr(model.get_submodule(parent), attr, FastAttention.replacing(module))
        elif type(module) is FeedForward:
            setattr(model.get_submodule(parent), attr, FastFeedForward.replacing(module))
        elif type(module) is Experts:
            setattr(model.get_submodule(parent), attr, FastExperts.replacing(module))
    return FastTransformer.replacing(model) if type(model) is Transformer else model


def count_parameters(model: nn.Module) -> int:
    """Weights a model holds, dense or in blocks; storage shared by tied layers is counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.raw.data_ptr() not in seen:
            seen.add(m.raw.data_ptr())
            n_el, n_bytes = BLOCK[m.type_name]
            total += m.raw.shape[0] * m.raw.shape[1] // n_bytes * n_el
    return total


def bytes_per_token(model: nn.Module) -> int:
    """The weight bytes one token's decode step reads, as held (blocks or dense): every layer's weights and
    the output layer, of each mixture of experts only the chosen experts' share (n_experts_used of
    n_experts), of the embedding table one row."""
    from ..model.transformer import ExpertLinear

    cfg = getattr(model, "config", None)
    share = cfg.n_experts_used / cfg.n_experts if cfg is not None and cfg.n_experts else 1.0
    seen, total = set(), 0.0
    for name, m in model.named_modules():
        tensors = [m.raw] if isinstance(m, (QuantLinear, QuantEmbedding)) else list(m.parameters(recurse=False))
        for t in tensors:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if name == "tok_embeddings" and not cfg.tie_embeddings:
                total += t.nbytes / t.shape[0]  # one row
            else:
                total += t.nbytes * (share if isinstance(m, (QuantExpertLinear, ExpertLinear)) else 1.0)
    return int(total)
