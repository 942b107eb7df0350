"""Load a model from the files users have: GGUF, a Hugging Face directory, a Meta checkpoint.

Each format gets one table mapping its tensor names onto Meta's (the names model.py uses). Weights
are read memory-mapped where the format allows, checked against the config's shapes, and assigned
into a model built on the meta device, so nothing is allocated twice.
"""

from __future__ import annotations

import gc
import json
import mmap
import re
from contextlib import contextmanager
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from torch import nn

from ..model.config import ModelConfig, RopeScaling, config_from_gguf, config_from_hf, config_from_meta
from .layout import NEOX_FAMILIES, family_layout
from .loaded import LoadedModel, ModelFileError
from ..kernels.ops import kernels_available
from ..model.transformer import Transformer, kv_type_name, rope_inv_freq
from ..text.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir, tokenizer_from_model_file

if TYPE_CHECKING:
    from typing import Callable, Protocol

    class Part(Protocol):
        """A part of a model that a rank reads (distributed/load.py's Split and Stages)."""

        def local_config(self) -> ModelConfig: ...

        def rename(self, name: str) -> str | None: ...

        def ranges(self, name: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]: ...


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         quantized: bool = True, kv_type: str | None = None) -> LoadedModel:
    """Load a GGUF file, an HF directory or a Meta checkpoint directory, telling which by its files,
    onto `device` in `dtype` (fp32 by default: without AVX-512 BF16, bf16 matmuls are slow on CPUs).
    GGUF Q4_0/Q4_1/Q8_0 weights stay quantized for the CPU kernels unless `quantized` is False (e.g.
    for training); on other devices they are dequantized, where dense matmuls are the fast path.
    `kv_type` (model.KV_TYPES) is what its KV caches hold; by default default_kv_type's choice.
    (backends.load also takes ExecuTorch programs and a rank's part under torchrun.)"""
    if kv_type is not None:
        kv_type_name(kv_type)  # an unknown name is refused before the weights are read
    on_cpu = torch.device(device).type == "cpu"
    return place(_load(Path(path).expanduser(), dtype, quantized and on_cpu), device, kv_type)


def place(lm: LoadedModel, device: str | torch.device = "cpu", kv_type: str | None = None) -> LoadedModel:
    """A loaded model moved to `device`, its chat template handed to its tokenizer, its KV type set."""
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu:
        lm.model.to(device)
    if lm.tokenizer is not None and lm.chat_template and not lm.tokenizer.chat_template:
        lm.tokenizer.chat_template = lm.chat_template  # travels with the tokenizer (save_tokenizer, GGUF export)
    if kv_type == "q8_0" and not on_cpu:
        raise ValueError(f"a q8_0 KV cache needs the CPU kernels, not {device}: use --kv-type f16 or bf16")
    lm.model.kv_type = kv_type or default_kv_type(lm.model)
    return lm


def default_kv_type(model: torch.nn.Module) -> str | None:
    """f16 for an fp32 model on the CPU kernels, whose attention reads fp16 keys and values directly:
    half the bytes of fp32 a step, so decode at long contexts runs faster (BENCHMARKS.md) for a
    rounding that keeps greedy answers (benchmarks/faithfulness.py). Otherwise None: the model's dtype."""
    on_cpu = model.norm.weight.device.type == "cpu"
    return "f16" if on_cpu and kernels_available() and model.norm.weight.dtype == torch.float32 else None


def _load(path: Path, dtype: torch.dtype, quantized: bool) -> LoadedModel:
    if not path.exists():
        raise ModelFileError(f"no model at {path}: give a GGUF file, a Hugging Face directory or a Meta "
                             f"checkpoint directory (or a name from `llamalite list`)")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return load_gguf(path, dtype, quantized)
        raise ModelFileError(f"{path} is not a GGUF file (it does not start with the GGUF magic); "
                             f"for a Hugging Face or Meta checkpoint give its directory")
    if (path / "config.json").exists():
        return load_hf(path, dtype)
    if (path / "params.json").exists():
        return load_meta(path, dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0], dtype, quantized)
    raise ModelFileError(f"{path} holds neither config.json (Hugging Face), params.json (Meta) nor one "
                         f".gguf file" + (f" (it holds {len(ggufs)} .gguf files: name one)" if ggufs else ""))


def load_tokenizer(path: str | Path) -> "Tokenizer":
    """Only the tokenizer of a model (GGUF file, HF or Meta directory), or of a tokenizer.json /
    tokenizer.model file: what `prepare` needs, without loading any weights."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"no model or tokenizer at {path}")
    if path.is_file():
        if path.name == "tokenizer.json":
            return tokenizer_from_hf_dir(path.parent)
        if path.suffix == ".model":
            return tokenizer_from_model_file(path)
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFileError(f"{path} is neither a GGUF file, a tokenizer.json nor a tokenizer.model")
        meta = gguf_metadata(open_gguf(path))
        tokenizer = tokenizer_from_gguf(meta)
        tokenizer.chat_template = meta.get("tokenizer.chat_template")
        return tokenizer
    if (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists():
        return tokenizer_from_hf_dir(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_tokenizer(ggufs[0])
    raise ModelFileError(f"{path} holds no tokenizer.json, tokenizer.model or single .gguf file")


@contextmanager
def _skip_init():
    """Skip nn.init while building on the meta device: the weights are assigned right after, and
    initialising meta tensors routes through torch's Python reference ops (and imports torch._dynamo,
    a second of start-up)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *args, **kwargs: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def build_model(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                quantized: Mapping[str, tuple[torch.Tensor, str, bool]] | None = None) -> Transformer:
    """Assign Meta-named weights into a model built without memory; shapes and names are checked.

    `quantized` maps weight names to (block bytes, type name, already packed): those layers become
    QuantLinear / QuantEmbedding modules holding the blocks (GGUF-ordered ones are repacked in place
    for the kernels: the caller hands over buffers it owns)."""
    from ..runtime.quantized import QuantEmbedding, QuantLinear, use_kernels
    from ..kernels.blocks import BLOCK

    quantized = dict(quantized or {})
    with torch.device("meta"), _skip_init():
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight")
    given = set(weights) | set(quantized)
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    if missing:
        raise ModelFileError(f"the checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    if unexpected:
        raise ModelFileError(f"the checkpoint has {len(unexpected)} tensors the config does not know, "
                             f"e.g. {unexpected[:3]}")
    state = {}
    for name, shape in expected.items():
        if name in quantized:
            raw, type_name, _ = quantized[name]
            n_el, n_bytes = BLOCK[type_name]
            w_shape = (raw.shape[0], raw.shape[1] // n_bytes * n_el)
        else:
            w_shape = tuple(weights[name].shape)
        if tuple(w_shape) != tuple(shape):
            raise ModelFileError(f"tensor {name!r} has shape {tuple(w_shape)} but the config expects {tuple(shape)}")
        if name not in quantized:
            state[name] = weights[name].to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for name, (raw, type_name, packed) in quantized.items():
        parent, attr = name.removesuffix(".weight").rsplit(".", 1) if "." in name.removesuffix(".weight") else (
            "", name.removesuffix(".weight"))
        owner = model.get_submodule(parent)
        if attr == "tok_embeddings":
            setattr(owner, attr, QuantEmbedding(raw, type_name, cfg.dim, in_place=True, packed=packed))
        else:
            layer = QuantLinear(raw, type_name, expected[name][1], in_place=True, packed=packed)
            layer.bias = getattr(owner, attr).bias  # a dense bias stays one (loaded above)
            setattr(owner, attr, layer)
    if cfg.tie_embeddings:
        emb = model.tok_embeddings
        if isinstance(emb, QuantEmbedding):
            model.output = QuantLinear.sharing(emb)
        else:
            model.output.weight = emb.weight
    return use_kernels(model).eval()


# ----- GGUF ---------------------------------------------------------------------------------------

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
}


def gguf_to_meta_name(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def meta_to_gguf_name(name: str) -> str:
    """The GGUF name of a Meta-named weight or bias (the reverse of gguf_to_meta_name)."""
    return _meta_to(name, _GGUF_NAMES, _GGUF_LAYER_NAMES, "blk.{i}.{name}.{kind}")


def _meta_to(name: str, top: Mapping[str, str], layer: Mapping[str, str], fmt: str) -> str:
    """A Meta name under another format's tables (format name -> Meta name), read backwards."""
    for theirs, ours in top.items():
        if ours == name:
            return theirs
    _, i, rest = name.split(".", 2)
    ours, kind = rest.rsplit(".", 1)
    return fmt.format(i=i, name=next(theirs for theirs, o in layer.items() if o == ours), kind=kind)


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
        from ..kernels.blocks import BLOCK

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
    from ..runtime.quantized import REQUANT_TYPES, requantize_q8_0
    from ..kernels.ops import KERNEL_TYPES, kernels_available
    from ..kernels.blocks import dequantize, q5_0_as_q8_0

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
        cfg = config_from_gguf(meta, has_output="output.weight" in tensors, rope_scaling=rope,
                               has_bias="blk.0.attn_q.bias" in tensors)
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
        if quantized and t.tensor_type.name in KERNEL_TYPES and len(shape) == 2:
            blocks[meta_name] = (torch.from_numpy(t.data), t.tensor_type.name, False)
            continue
        if quantized and t.tensor_type.name == "Q5_0" and len(shape) == 2 and kernels_available():
            blocks[meta_name] = (q5_0_as_q8_0(t.data, shape[0]), "Q8_0", False)  # exact, 34 bytes for 22
            _drop_pages(reader, t.data_offset, t.n_bytes)
            continue
        try:
            if quantized and t.tensor_type.name in REQUANT_TYPES and len(shape) == 2 and kernels_available():
                blocks[meta_name] = (requantize_q8_0(t.data, t.tensor_type.name, shape), "Q8_0", True)
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


# ----- Hugging Face -------------------------------------------------------------------------------

_HF_LAYER_NAMES = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",  # Qwen3
    "self_attn.qkv_proj": "attention.wqkv", "mlp.gate_up_proj": "feed_forward.w3",  # Phi-3's fused ones (family_layout)
}
_HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}


def hf_to_meta_name(name: str) -> str | None:
    if name in _HF_NAMES:
        return _HF_NAMES[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def meta_to_hf_name(name: str) -> str:
    """The Hugging Face name of a Meta-named weight or bias (the reverse of hf_to_meta_name)."""
    return _meta_to(name, _HF_NAMES, _HF_LAYER_NAMES, "model.layers.{i}.{name}.{kind}")


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    from safetensors import safe_open

    try:
        cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path / 'config.json'} cannot be read as a Llama config: {e}") from e
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelFileError(f"{path} has no model.safetensors or model.safetensors.index.json "
                             f"(PyTorch .bin checkpoints are not loaded: convert them to safetensors)")
    weights = {}
    for fname in files:
        if not (path / fname).exists():
            raise ModelFileError(f"{path / fname} is named in the index but missing: download it again")
        with safe_open(path / fname, framework="pt") as f:
            for name in f.keys():
                meta_name = hf_to_meta_name(name)
                if meta_name is None:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ModelFileError(f"{path / fname}: tensor {name!r} is not part of a llama model")
                weights[meta_name] = f.get_tensor(name)
    family_layout(cfg, weights, {}, neox=True)  # every HF family rotates half-split pairs
    if cfg.tie_embeddings:
        weights.pop("output.weight", None)
    types = Counter(str(w.dtype).removeprefix("torch.") for w in weights.values())
    model = build_model(cfg, weights, dtype)
    tokenizer = tokenizer_from_hf_dir(path)
    template = None
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists():
        template = json.loads(tok_cfg.read_text()).get("chat_template")
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # a list of named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return LoadedModel(model, tokenizer, template, path, "hf", types)


# ----- Meta ---------------------------------------------------------------------------------------

# Dimension along which Meta's model-parallel shards split each weight (fairscale Column/RowParallel).
_META_SHARD_DIM: list[tuple[str, int | None]] = [
    ("attention.wq", 0), ("attention.wk", 0), ("attention.wv", 0), ("attention.wo", 1),
    ("feed_forward.w1", 0), ("feed_forward.w3", 0), ("feed_forward.w2", 1), ("output", 0),
    ("norm", None),  # attention_norm, ffn_norm, norm: replicated
]


def _meta_shard_dim(name: str, shard: torch.Tensor, vocab_size: int) -> int | None:
    if name.startswith("tok_embeddings"):
        # LLaMA 1/2 split the embedding by columns (ParallelEmbedding), Llama 3 by rows.
        return 1 if shard.shape[0] == vocab_size else 0
    for key, dim in _META_SHARD_DIM:
        if key in name:
            return dim
    return None


def load_meta(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise ModelFileError(f"{path} has params.json but no consolidated.*.pth")
    if not (path / "tokenizer.model").exists():
        raise ModelFileError(f"{path} has no tokenizer.model (it comes with the Meta download)")
    tokenizer = tokenizer_from_model_file(path / "tokenizer.model")
    try:
        cfg = config_from_meta(json.loads((path / "params.json").read_text()), vocab_size=tokenizer.vocab_size)
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path / 'params.json'} cannot be read: {e}") from e
    parts = []
    for s in shards:
        try:
            # weights_only: a checkpoint is tensors, never arbitrary pickled objects.
            parts.append(torch.load(s, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:
            raise ModelFileError(f"{s} cannot be read as a Meta checkpoint ({e}); it may be truncated") from e
    weights: dict[str, torch.Tensor] = {}
    for name in parts[0]:
        if name.endswith("rope.freqs"):  # LLaMA 1 stored RoPE frequencies; they are recomputed
            continue
        tensors = [p[name] for p in parts]
        dim = _meta_shard_dim(name, tensors[0], cfg.vocab_size) if len(tensors) > 1 else None
        weights[name] = tensors[0] if dim is None else torch.cat(tensors, dim=dim)
    types = Counter(str(w.dtype).removeprefix("torch.") for w in weights.values())
    model = build_model(cfg, weights, dtype)
    return LoadedModel(model, tokenizer, None, path, "meta", types)

