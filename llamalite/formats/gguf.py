"""GGUF files (llama.cpp's): the tensor-name table, the config read from the metadata, a fast reader over
the memory map, and the loader (a part of the model only, under torchrun: load_gguf(part=...))."""

from __future__ import annotations

import gc
import mmap
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from ..kernels.blocks import BLOCK, dequantize, mxfp4_as_q8_0, q5_0_as_q8_0
from ..kernels.ops import KERNEL_TYPES, kernels_available
from ..model.config import GGUF_FAMILIES, ModelConfig, RopeScaling
from ..model.transformer import rope_inv_freq
from ..text.tokenizer import tokenizer_from_gguf
from .build import build_model
from .layout import NEOX_FAMILIES, family_layout, meta_name, reverse_name
from .loaded import LoadedModel, ModelFileError

if TYPE_CHECKING:
    from typing import Callable, Protocol

    class Part(Protocol):
        """A part of a model that a rank reads (distributed/load.py's Split and Stages)."""

        def local_config(self) -> ModelConfig: ...

        def rename(self, name: str) -> str | None: ...

        def ranges(self, name: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]: ...


_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}


_GGUF_LAYER_NAMES = {
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",  # Qwen3
    "attn_qkv": "attention.wqkv",  # Phi-3's fused q/k/v (split at load, family_layout); its ffn_up holds gate and up
    # Mixtures of experts: the router, the experts (one (n_experts, out, in) tensor a projection), Qwen2-MoE's
    # shared expert and its gate (a vector here, a (1, dim) matrix in the model)
    "ffn_gate_inp": "feed_forward.gate", "ffn_gate_exps": "feed_forward.experts.w1",
    "ffn_down_exps": "feed_forward.experts.w2", "ffn_up_exps": "feed_forward.experts.w3",
    "ffn_gate_shexp": "feed_forward.shared.w1", "ffn_down_shexp": "feed_forward.shared.w2",
    "ffn_up_shexp": "feed_forward.shared.w3", "ffn_gate_inp_shexp": "feed_forward.shared_gate",
    # gpt-oss's: its sinks, and its feed-forward's norm under another name (written so by the exporter)
    "attn_sinks": "attention.sinks", "post_attention_norm": "ffn_norm",
}
# The architecture of a family's mixture-of-experts files (Mixtral's are llama files with experts)
GGUF_MOE_ARCH = {"llama": "llama", "qwen2": "qwen2moe", "qwen3": "qwen3moe", "llama4": "llama4", "gpt-oss": "gpt-oss"}
# How llama.cpp's architectures weigh the chosen experts, whatever a file says: (router, rescaled to sum to 1,
# the weight scales the expert's input)
MOE_ROUTING = {"llama": ("softmax", True, False), "qwen2moe": ("softmax", False, False),
               "qwen3moe": ("softmax", True, False), "llama4": ("sigmoid", False, True),
               "gpt-oss": ("softmax", True, False)}
# What llama.cpp's gpt-oss architecture fixes: every other layer (the first, third, ...) attends to a sliding window
# (of the file's sliding_window), and its experts' clamped SwiGLU
GPT_OSS_FIXED = dict(attention_sinks=True, sliding_window_pattern=2, swiglu_limit=7.0, swiglu_alpha=1.702)
# What llama.cpp's llama4 architecture fixes, not read from a file: chunks of 8192 on RoPE layers, one layer in
# four without RoPE and with temperature tuning (floor 8192, scale 0.1); a file whose sliding_window is 0 has
# neither. Its q/k L2 norms are on unless the model has 128 experts (Maverick).
LLAMA4_ATTENTION = dict(attention_chunk=8192, nope_layer_step=4, attn_temp_floor=8192, attn_temp_scale=0.1)


def gguf_to_meta_name(name: str) -> str | None:
    return meta_name(name, _GGUF_NAMES, _GGUF_LAYER_NAMES, r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def meta_to_gguf_name(name: str) -> str:
    """The GGUF name of a Meta-named weight or bias (the reverse of gguf_to_meta_name)."""
    return reverse_name(name, _GGUF_NAMES, _GGUF_LAYER_NAMES, "blk.{i}.{name}.{kind}")


def open_gguf(path: Path):
    """A `gguf.GGUFReader` over a plain ndarray view of the memory map, with a faster parse of arrays.

    The reader slices its `np.memmap` once per metadata item, and each memmap slice costs a Python-level
    `__array_finalize__`: a plain ndarray view of the same mapping parses a 49k-token vocabulary 3x
    faster and still reads tensors lazily from the page cache. Arrays are then most of the header (a
    vocabulary's tokens, scores, types and merges: 147k items for the default model, each a numpy view
    or two): an array of numbers becomes one view of all of them, and each string of an array two
    memoryview slices (what a field's `contents()` reads: `nbytes`, `tobytes()`), which took the
    default model's metadata from about 0.5 s to 0.1 s (with the cyclic collector paused meanwhile).
    """
    import gguf

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)
            self._bytes = memoryview(self._data).cast("B")
            self.file_map = getattr(value, "_mmap", None)  # the mmap.mmap object under the np.memmap

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, n, offs = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None and n > 0:  # numbers: one view of the whole array
                values = self._get(offs, nptype, n)
                return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [raw_type, itype]
            if itype != gguf.GGUFValueType.STRING or n == 0:
                return super()._get_field_parts(orig_offs, raw_type)
            mv, parts, idxs = self._bytes, [raw_itype, alen], []
            for _ in range(n):  # strings: (length, bytes) as memoryview slices
                size = int.from_bytes(mv[offs:offs + 8], "little")
                idxs.append(len(parts) + 1)
                parts += (mv[offs:offs + 8], mv[offs + 8:offs + 8 + size])
                offs += 8 + size
            return offs - orig_offs, parts, idxs, [raw_type, itype]

    collecting = gc.isenabled()
    gc.disable()  # 100k new objects would set off the cyclic collector again and again for nothing
    try:
        return Reader(path, "c")  # copy-on-write: writable arrays, still read lazily
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not a readable GGUF file ({e}); it may be truncated or corrupt: "
                             f"download it again") from e
    finally:
        if collecting:
            gc.enable()


def _drop_pages(reader, start: int, length: int) -> None:
    """Unmaps the pages wholly inside bytes [start, start + length) of the file map from this process:
    a tensor converted at load into a buffer of its own is not read again, and its pages would
    otherwise count in the resident set for the life of the model (the page cache keeps them). Only
    pages never written: the copy-on-write pages of in-place repacked neighbours are outside the range."""
    mm = getattr(reader, "file_map", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class _ShardView:
    """A GGUF tensor cut to one rank's rows and whole-block columns (parallel.Split.ranges), read as the
    loader reads a tensor: `data` (rows of blocks as bytes, or of elements), `tensor_type`, the Meta-order
    `shape`. A row range is a view of the memory map (only its pages are ever touched); a column range
    is copied out, row by row, and the tensor's pages (every one of them held a piece) are dropped from
    this process's memory again."""

    def __init__(self, t, rows: tuple[int, int] | None, cols: tuple[int, int] | None, shape: tuple[int, ...],
                 reader=None):

        self.tensor_type, self.data_offset, self.n_bytes = t.tensor_type, t.data_offset, t.n_bytes
        self.data, self.shape = t.data, shape
        if len(shape) == 1 and rows is not None:  # a bias
            self.data, self.shape = t.data[rows[0]:rows[1]], (rows[1] - rows[0],)
            return
        if len(shape) != 2 or (rows is None and cols is None):
            return
        r0, r1 = rows or (0, shape[0])
        c0, c1 = cols or (0, shape[1])
        data = t.data[r0:r1]
        if cols is not None:
            if data.shape[1] == shape[1]:  # one entry an element (F32, F16)
                b0, b1 = c0, c1
            else:  # rows of blocks, as bytes
                n_el, n_bytes = BLOCK[t.tensor_type.name]
                if c0 % n_el or c1 % n_el:
                    raise ModelFileError(f"columns {c0}:{c1} of a {t.tensor_type.name} tensor do not fall on whole "
                                         f"blocks of {n_el}")
                b0, b1 = c0 // n_el * n_bytes, c1 // n_el * n_bytes
            data = np.ascontiguousarray(data[:, b0:b1])
            if reader is not None:
                _drop_pages(reader, t.data_offset, t.n_bytes)
        self.data, self.shape = data, (r1 - r0, c1 - c0)


def gguf_vocab_only(path: Path) -> dict[str, Any] | None:
    """A GGUF file with no tensors (llama.cpp's ggml-vocab-*.gguf): its metadata; None for anything else."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return None
    reader = open_gguf(path)
    return None if len(reader.tensors) else gguf_metadata(reader)


def gguf_metadata(reader) -> dict[str, Any]:
    return {k: v.contents() for k, v in reader.fields.items()}


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, quantized: bool = True,
              part: "Callable[[ModelConfig, dict[str, str]], Part] | None" = None) -> LoadedModel:
    """With `quantized`, Q4_0/Q4_1/Q8_0 weights stay in their blocks (QuantLinear), and the other lossy
    block types are re-quantized to Q8_0 for the kernels; F32/F16/BF16 weights, or everything when
    `quantized` is False, are dequantized to `dtype`. With `part`, only a part of the model is read:
    `part(config, {tensor name: type name})` gives a Part (distributed/load.py builds them: a rank's
    heads, or its layers), whose config is the part's own, which renames each Meta-named weight (None:
    not in this part) and gives the rows and columns of it that the part keeps (memory-map views)."""
    from ..runtime.quantized import REQUANT_TYPES, requantize_q8_0  # the runtime's layers: built on use

    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if not tensors:
        raise ModelFileError(f"{path} holds a tokenizer's vocabulary and no weights (a vocab-only GGUF file): it "
                             f"can tokenize (`llamalite tokenize --model {path}`), not run; give a model file")
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{path} is truncated: tensor {t.name!r} runs past the end of the file "
                                 f"({size} bytes); download it again")
    rope = None
    if "rope_freqs.weight" in tensors:
        rope = _match_rope_freqs(meta, np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32))
    try:
        dense = tuple(i for i in range(int(meta.get(f"{meta.get('general.architecture')}.block_count", 0)))
                      if f"blk.{i}.ffn_gate_inp.weight" not in tensors)
        cfg = config_from_gguf(meta, has_output="output.weight" in tensors, rope_scaling=rope,
                               has_bias="blk.0.attn_q.bias" in tensors, dense_layers=dense, names=frozenset(tensors))
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from e
    if part is not None:
        part = part(cfg, {name: t.tensor_type.name for name, t in tensors.items()})
        cfg = part.local_config()
    weights, blocks = {}, {}
    types: Counter = Counter()
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        meta_name = gguf_to_meta_name(name)
        if name.startswith("rope_factors_"):
            raise ModelFileError(f"{path}: {name} is Phi-3's long-context RoPE (longrope), which llamalite does not "
                                 f"run yet; use a 4k-context Phi-3 file")
        if meta_name is None:
            raise ModelFileError(f"{path}: tensor {name!r} is not part of a {cfg.family} model")
        if part is not None:
            meta_name = part.rename(meta_name)
            if meta_name is None:  # another part's layer: never read here
                continue
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions fastest-first
        types[t.tensor_type.name] += 1
        if part is not None:
            t = _ShardView(t, *part.ranges(meta_name), shape, reader)
            shape = t.shape
        if meta_name.endswith("shared_gate.weight"):
            shape = (1, *shape)  # a vector in the file, one row of a matrix in the model
        rows = int(np.prod(shape[:-1]))  # the experts' rows one after another, for a 3-D tensor
        matrix = len(shape) in (2, 3)
        if quantized and t.tensor_type.name in KERNEL_TYPES and matrix:
            blocks[meta_name] = (torch.from_numpy(t.data).reshape(rows, -1), t.tensor_type.name, False)
            continue
        if quantized and t.tensor_type.name == "Q5_0" and matrix and kernels_available():
            blocks[meta_name] = (q5_0_as_q8_0(t.data, rows), "Q8_0", False)  # exact, 34 bytes for 22
            _drop_pages(reader, t.data_offset, t.n_bytes)
            continue
        exact = (mxfp4_as_q8_0(t.data, rows) if quantized and t.tensor_type.name == "MXFP4" and matrix
                 and kernels_available() else None)
        if exact is not None:  # the same values as Q8_0 blocks, 34 bytes for 17, until MXFP4 has a kernel
            blocks[meta_name] = (exact, "Q8_0", False)
            _drop_pages(reader, t.data_offset, t.n_bytes)
            continue
        try:
            if quantized and t.tensor_type.name in REQUANT_TYPES and matrix and kernels_available():
                blocks[meta_name] = (requantize_q8_0(t.data, t.tensor_type.name, (rows, shape[-1])), "Q8_0", True)
                _drop_pages(reader, t.data_offset, t.n_bytes)
            else:
                weights[meta_name] = dequantize(t.data, t.tensor_type.name, shape)
        except ValueError as e:
            raise ModelFileError(f"{path}: tensor {name!r}: {e}") from e
    family_layout(cfg, weights, blocks, neox=cfg.family in NEOX_FAMILIES)
    model = build_model(cfg, weights, dtype, blocks)
    tokenizer = tokenizer_from_gguf(meta)
    template = meta.get("tokenizer.chat_template")
    small_meta = {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.")}
    return LoadedModel(model, tokenizer, template, path, "gguf", types, small_meta)


def _match_rope_freqs(meta: Mapping[str, Any], factors: np.ndarray) -> RopeScaling:
    """Llama 3.1+ GGUF files store RoPE scaling as per-frequency divisors: find the scaling they encode."""
    n_heads = meta["llama.attention.head_count"]
    head_dim = meta.get("llama.rope.dimension_count", meta["llama.embedding_length"] // n_heads)
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    base = rope_inv_freq(head_dim, theta)
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for low, high, orig in ((1.0, 4.0, 8192),):
            cand = RopeScaling(factor, low, high, orig)
            implied = (base / rope_inv_freq(head_dim, theta, cand)).numpy()
            if np.allclose(implied, factors, rtol=1e-4):
                return cand
    raise ModelFileError("this GGUF file's rope_freqs tensor matches no Llama 3.1 scaling llamalite knows")


def config_from_gguf(meta: Mapping[str, Any], has_output: bool, rope_scaling: RopeScaling | None = None,
                     has_bias: bool = False, dense_layers: tuple[int, ...] = (),
                     names: frozenset[str] = frozenset()) -> ModelConfig:
    """Read GGUF key-values (already decoded to Python values) of a file of the LLaMA lineage (general.
    architecture llama, qwen2, qwen3, phi3, or the mixtures of experts qwen2moe, qwen3moe, and llama with
    experts: Mixtral; keys are named after it). `has_bias` says whether the file has q/k/v biases, and
    `dense_layers` which layers of a mixture of experts have no router (tensors, not keys).

    Llama 3.1 files carry RoPE scaling as a `rope_freqs` tensor, not as keys: the loader matches that
    tensor to a RopeScaling and passes it in."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_FAMILIES)})")
    family = GGUF_FAMILIES[arch]

    def key(name: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise ValueError(f"GGUF file lacks the required key {full!r}")
        return default

    n_heads = key("attention.head_count")
    dim = key("embedding_length")
    vocab = key("vocab_size", None)
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"])
    scale_type = key("rope.scaling.type", None)
    if scale_type == "yarn" and arch == "gpt-oss":  # as the model defines it (no rounding of YaRN's ramp)
        rope_scaling = RopeScaling(factor=float(key("rope.scaling.factor")),
                                   original_context=int(key("rope.scaling.original_context_length")), kind="yarn",
                                   beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
                                   beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)), truncate=False)
    elif scale_type not in (None, "none"):
        raise ValueError(f"GGUF rope.scaling.type {scale_type!r} is not supported")
    head_dim = key("attention.key_length", key("rope.dimension_count", dim // n_heads))
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"RoPE over {key('rope.dimension_count')} of each head's {head_dim} dimensions (partial "
                         f"rotary) is not supported")
    context = key("context_length", 2048)
    window = key("attention.sliding_window", None) if arch != "gpt-oss" else None  # (gpt-oss's: its layers')
    if window:  # as config_from_hf: stop short of where the model's window cuts the context
        context = min(context, int(window))
    return ModelConfig(
        dim=dim,
        n_layers=key("block_count"),
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", n_heads),
        vocab_size=vocab,
        hidden_dim=key("feed_forward_length", meta.get(f"{arch}.expert_feed_forward_length", KeyError)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        context_length=context,
        tie_embeddings=not has_output,
        head_dim=head_dim,
        family=family,
        qkv_bias=has_bias,
        qk_norm=family == "qwen3",
        **_gguf_experts(meta, arch, dense_layers),
        **(dict(GPT_OSS_FIXED, sliding_window=int(key("attention.sliding_window", 0)), o_bias="blk.0.attn_output.bias" in names,
                router_bias="blk.0.ffn_gate_inp.bias" in names, expert_bias="blk.0.ffn_gate_exps.bias" in names)
           if arch == "gpt-oss" else {}),
    )


def _gguf_experts(meta: Mapping[str, Any], arch: str, dense_layers: tuple[int, ...]) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from a file's keys (none for a dense model)."""
    n = int(meta.get(f"{arch}.expert_count", 0) or 0)
    if not n:
        return {}
    router, norm, weight_input = MOE_ROUTING[arch]
    expert_dim = int(meta.get(f"{arch}.expert_feed_forward_length", meta[f"{arch}.feed_forward_length"]))
    shared = expert_dim if arch == "llama4" else int(meta.get(f"{arch}.expert_shared_feed_forward_length", 0) or 0)
    out = dict(n_experts=n, n_experts_used=int(meta[f"{arch}.expert_used_count"]), expert_hidden_dim=expert_dim,
               expert_router=router, expert_norm=norm, expert_weight_input=weight_input,
               shared_expert_dim=shared, shared_expert_gate=bool(shared) and arch == "qwen2moe",
               dense_layers=dense_layers if len(dense_layers) < int(meta[f"{arch}.block_count"]) else ())
    if arch == "llama4" and meta.get(f"{arch}.attention.sliding_window", None) != 0:
        out.update(LLAMA4_ATTENTION, qk_l2_norm=n != 128)
    elif arch == "llama4":
        out.update(qk_l2_norm=n != 128)
    return out
