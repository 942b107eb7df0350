"""Writing models out in other tools' formats: GGUF (llama.cpp and everything built on it) and
Hugging Face (config.json + model.safetensors + tokenizer files, what transformers loads).

The source is a training checkpoint (`ckpt-*.pt` / `best.pt`, or a run directory) or any model
llamalite loads. GGUF files carry the tokenizer (`tokenizer.ggml.*`) and chat template, so
llama.cpp needs nothing else; weights go out as F32, F16, Q8_0 or Q4_0 (norms stay F32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.config import ModelConfig
from .layout import NEOX_FAMILIES, family_tensors
from .gguf import GGUF_MOE_ARCH, GPT_OSS_FIXED, LLAMA4_ATTENTION, MOE_ROUTING, meta_to_gguf_name
from .hf import hf_experts_config, hf_tensors

DTYPES = ("f32", "f16", "q8_0", "q4_1", "q4_0", "mxfp4")
# export dtype -> GGML block type; mxfp4 (llama.cpp's MOSTLY_MXFP4_MOE): the experts MXFP4, the other matrices Q8_0
QUANT_TYPES = {"q8_0": "Q8_0", "q4_1": "Q4_1", "q4_0": "Q4_0", "mxfp4": "Q8_0"}


class ExportError(ValueError):
    """What cannot be exported, and what to do instead."""


def gguf_add_config(writer: Any, cfg: ModelConfig, vocab_size: int | None = None) -> None:
    """The `<architecture>.*` keys of a GGUF file for `cfg`, on a `gguf.GGUFWriter` made for the family's
    architecture (the reverse of config_from_gguf; RoPE scaling, which GGUF stores as a tensor, is not
    written)."""
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.dim)
    # llama.cpp's llama architecture (Mixtral) sizes its experts by feed_forward_length
    moe_llama = cfg.n_experts and cfg.family == "llama"
    writer.add_feed_forward_length(cfg.expert_hidden_dim if moe_llama else cfg.hidden_dim)
    if cfg.n_experts:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.n_experts_used)
        writer.add_expert_feed_forward_length(cfg.expert_hidden_dim)
        writer.add_expert_weights_norm(cfg.expert_norm)
        import gguf

        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX if cfg.expert_router == "softmax"
                                      else gguf.ExpertGatingFuncType.SIGMOID)
        if cfg.shared_expert_dim:
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_dim)
        if cfg.family == "llama4":
            writer.add_interleave_moe_layer_step(_moe_step(cfg) or 1)
    if cfg.family == "gpt-oss":
        import gguf

        writer.add_sliding_window(cfg.sliding_window)
        if cfg.rope_scaling is not None:  # YaRN, as keys (llama3's scaling goes in a tensor: export_gguf)
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
            writer.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_context)
    if cfg.family == "llama4" and not cfg.attention_chunk:
        writer.add_sliding_window(0)  # llama.cpp's llama4: no chunks and no NoPE layers
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(vocab_size or cfg.vocab_size)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.family != "llama":  # how llama.cpp's qwen2/qwen3/phi3 read a head's size
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)


def _bpe_pre_name(data: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from the splits its pre-tokenizer makes in
    order: a Split's regex, Digits (each digit alone: llama.cpp's \\p{N}) and ByteLevel's own regex
    (GPT-2's) where it uses one. The first name llama.cpp knows for those regexes; "default" if none."""
    from ..text.tokenizer import GPT2_REGEX, BPE_PRE_TOKENIZERS

    def walk(node: Any) -> list[dict]:
        if not isinstance(node, dict):
            return []
        return [node] + [n for child in node.get("pretokenizers") or [] for n in walk(child)]

    regexes = []
    for n in walk(data.get("pre_tokenizer")):
        if n.get("type") == "Split" and "Regex" in n.get("pattern", {}):
            regexes.append(n["pattern"]["Regex"])
        elif n.get("type") == "Digits":
            regexes.append(r"\p{N}" if n.get("individual_digits") else r"\p{N}+")
        elif n.get("type") == "ByteLevel" and n.get("use_regex", True):
            regexes.append(GPT2_REGEX)
    for name, (known, _) in BPE_PRE_TOKENIZERS.items():
        if regexes and tuple(regexes) == tuple(known):
            return name
    return "default"


def gguf_add_tokenizer(writer: Any, tokenizer, vocab_size: int | None = None) -> None:
    """The `tokenizer.ggml.*` keys (and chat template) for a llamalite Tokenizer; a model whose embedding
    has more rows than the tokenizer has tokens (`vocab_size`) gets fillers for the rest, as llama.cpp's
    converter writes them ([PAD<id>], unused), since llama.cpp sizes the embedding by the token list."""
    import gguf

    from ..text.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, HFEngine, SPEngine

    engine, n = tokenizer.engine, tokenizer.vocab_size
    if isinstance(engine, HFEngine):
        data = json.loads(engine.tok.to_str())
        if data["model"]["type"] != "BPE":
            raise ExportError(f"a {data['model']['type']} tokenizer.json cannot go into GGUF (BPE or SentencePiece only)")
        added = {t["id"]: t["special"] for t in data.get("added_tokens", [])}
        tokens = [engine.tok.id_to_token(i) for i in range(n)]
        if any(t is None for t in tokens):
            raise ExportError("the tokenizer's ids have gaps; GGUF needs a token for every id")
        pad = max(0, (vocab_size or n) - n)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer.gguf_settings.get("tokenizer.ggml.pre") or _bpe_pre_name(data))
        writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(n, n + pad)])
        writer.add_token_types([(CONTROL if added[i] else USER_DEFINED) if i in added else NORMAL for i in range(n)]
                               + [UNUSED] * pad)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    elif isinstance(engine, SPEngine):
        from sentencepiece import sentencepiece_model_pb2 as pb

        sp = engine.sp
        proto = pb.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        kinds = {pb.ModelProto.SentencePiece.NORMAL: NORMAL, pb.ModelProto.SentencePiece.UNKNOWN: UNKNOWN,
                 pb.ModelProto.SentencePiece.CONTROL: CONTROL, pb.ModelProto.SentencePiece.USER_DEFINED: USER_DEFINED,
                 pb.ModelProto.SentencePiece.UNUSED: UNUSED, pb.ModelProto.SentencePiece.BYTE: BYTE}
        pad = max(0, (vocab_size or n) - n)
        writer.add_tokenizer_model("llama")
        writer.add_token_list([p.piece for p in proto.pieces] + [f"[PAD{i}]" for i in range(n, n + pad)])
        writer.add_token_scores([p.score for p in proto.pieces] + [-1000.0] * pad)
        types = engine.gguf_types if engine.gguf_types and len(engine.gguf_types) == n else \
            [kinds.get(p.type, NORMAL) for p in proto.pieces]
        writer.add_token_types(list(types) + [UNUSED] * pad)
        writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    else:
        raise ExportError(f"cannot write a {type(engine).__name__} tokenizer into GGUF")
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    eot = sorted(tokenizer.end_ids - {tokenizer.eos_id})
    if eot:
        writer.add_eot_token_id(eot[0])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    # The source file's other settings, as they were (add_eos_token, unknown_token_id, ...); the ones
    # written above come from the same tokenizer, so they agree with the source's.
    written = {key for kv in writer.kv_data for key in kv}  # GGUFWriter refuses a key twice
    for key, value in tokenizer.gguf_settings.items():
        if key not in written and not (key == "tokenizer.ggml.pre" and isinstance(engine, SPEngine)):
            kind = (gguf.GGUFValueType.BOOL if isinstance(value, bool) else gguf.GGUFValueType.UINT32 if isinstance(value, int)
                    else gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.STRING)
            writer.add_key_value(key, value, kind)


def _gguf_mismatch(cfg: ModelConfig, arch: str) -> str | None:
    """What of `cfg` llama.cpp's `arch` computes otherwise (it fixes these, whatever a file says); None: nothing."""
    if cfg.n_experts:
        router, norm, weight_input = MOE_ROUTING[arch]
        if (cfg.expert_router, cfg.expert_norm, cfg.expert_weight_input) != (router, norm, weight_input):
            return (f"weighs the chosen experts by a {router} {'rescaled' if norm else 'not rescaled'} to sum to 1 "
                    f"({'on their input' if weight_input else 'on their output'}); this model's are "
                    f"{cfg.expert_router}, {'rescaled' if cfg.expert_norm else 'not rescaled'}, "
                    f"{'on their input' if cfg.expert_weight_input else 'on their output'}")
    if cfg.family == "llama4":
        fixed = {k: getattr(cfg, k) for k in LLAMA4_ATTENTION}
        if fixed != LLAMA4_ATTENTION and (cfg.attention_chunk or cfg.nope_layer_step):
            return f"has {LLAMA4_ATTENTION} (or neither chunks nor NoPE layers), this model {fixed}"
        if cfg.qk_l2_norm != (cfg.n_experts != 128):
            return f"L2-norms q and k where a model has other than 128 experts; this model {'does' if cfg.qk_l2_norm else 'not'}"
        step = _moe_step(cfg)
        if step is None or cfg.shared_expert_dim != cfg.expert_hidden_dim:
            return "has a shared expert of the experts' size and experts in every n-th layer"
    elif cfg.nope_layer_step or cfg.attention_chunk or cfg.qk_l2_norm or cfg.attn_temp_floor:
        return "has no NoPE layers, chunks, q/k L2 norms or temperature tuning"
    if cfg.family == "gpt-oss":
        fixed = {k: getattr(cfg, k) for k in GPT_OSS_FIXED}
        if fixed != GPT_OSS_FIXED or (cfg.rope_scaling is not None and (cfg.rope_scaling.kind, cfg.rope_scaling.truncate,
                                                                          cfg.rope_scaling.beta_fast, cfg.rope_scaling.beta_slow)
                                      != ("yarn", False, 32.0, 1.0)):
            return f"has {GPT_OSS_FIXED} and YaRN (beta 32 and 1, no rounding); this model {fixed}, {cfg.rope_scaling}"
    elif (cfg.attention_sinks or cfg.sliding_window or cfg.o_bias or cfg.router_bias or cfg.expert_bias or cfg.swiglu_limit
          or (cfg.rope_scaling is not None and cfg.rope_scaling.kind != "llama3")):
        return "has no attention sinks, windows, output or expert biases, clamped SwiGLU or YaRN"
    return None


def _moe_step(cfg: ModelConfig) -> int | None:
    """n where the experts are in layers n-1, 2n-1, ... (llama.cpp's interleave_moe_layer_step); None: elsewhere."""
    moe = [i for i in range(cfg.n_layers) if cfg.moe_layer(i)]
    for step in range(1, cfg.n_layers + 1):
        if moe == list(range(step - 1, cfg.n_layers, step)):
            return step
    return None


def gguf_architecture(cfg: ModelConfig) -> str:
    """The general.architecture a model of `cfg` is written as: its family's, or the family's mixture-of-experts
    architecture (Mixtral's is llama's)."""
    return GGUF_MOE_ARCH[cfg.family] if cfg.n_experts else cfg.family


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Meta-named fp32 weights and biases of a dense Transformer (tied output left out)."""
    cfg = model.config
    out = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k.endswith((".weight", ".bias"))}
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def export_gguf(model: torch.nn.Module, tokenizer, path: str | Path, dtype: str = "f32", name: str = "llamalite") -> Path:
    import gguf
    from gguf import GGMLQuantizationType as T

    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    cfg: ModelConfig = model.config
    if dtype.startswith("q") and cfg.dim % 32:
        raise ExportError(f"{dtype} packs rows in blocks of 32, but dim is {cfg.dim}: export as f16 or f32")
    if cfg.n_experts and cfg.family not in GGUF_MOE_ARCH:
        raise ExportError(f"a {cfg.family} model with experts has no GGUF architecture (those with one: "
                          f"{', '.join(GGUF_MOE_ARCH)})")
    if cfg.dense_layers and cfg.n_experts and cfg.family != "llama4" and (
            cfg.family != "llama" or cfg.hidden_dim != cfg.expert_hidden_dim):
        raise ExportError(f"layers {list(cfg.dense_layers)} have a dense feed-forward, which llama.cpp's "
                          f"{gguf_architecture(cfg)} architecture does not have: export to Hugging Face (--to hf)")
    arch = gguf_architecture(cfg)
    problem = _gguf_mismatch(cfg, arch)
    if problem:
        raise ExportError(f"llama.cpp's {arch} architecture {problem}: export to Hugging Face (--to hf)")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)  # llama, qwen2, qwen3, phi3, qwen2moe, qwen3moe
    w.add_name(name)
    if dtype == "mxfp4" and not cfg.n_experts:
        raise ExportError("mxfp4 quantizes a mixture's experts, and this model has none: use q8_0 or q4_0")
    w.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "mxfp4": 38}[dtype])
    gguf_add_config(w, cfg)
    if tokenizer is not None:
        gguf_add_tokenizer(w, tokenizer, cfg.vocab_size)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        from ..model.transformer import rope_inv_freq

        base = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        w.add_tensor("rope_freqs.weight", (base / rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)).numpy())

    for meta_name, t in family_tensors(cfg, _weights(model), cfg.family in NEOX_FAMILIES).items():
        gname = meta_to_gguf_name(meta_name)
        if cfg.family == "gpt-oss" and meta_name.endswith("ffn_norm.weight"):
            gname = gname.replace(".ffn_norm.", ".post_attention_norm.")  # llama.cpp's name for it there
        if meta_name.endswith("shared_gate.weight"):
            t = t.reshape(-1)  # a vector in GGUF (llama.cpp's ffn_gate_inp_shexp)
        arr = np.ascontiguousarray(t.numpy(), dtype=np.float32)
        # routers stay f32, as llama.cpp's quantizer leaves them: which experts a token takes hangs on them
        router = meta_name.endswith(("feed_forward.gate.weight", "shared_gate.weight"))
        if arr.ndim == 1 or meta_name.endswith("bias") or dtype == "f32" or router or (
                dtype != "f16" and arr.shape[-1] % 32):
            w.add_tensor(gname, arr)
        elif dtype == "f16":
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            qtype = T.MXFP4 if dtype == "mxfp4" and ".experts." in meta_name else T[QUANT_TYPES[dtype]]
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def export_hf(model: torch.nn.Module, tokenizer, out: str | Path, dtype: str = "f32") -> Path:
    from safetensors.torch import save_file

    from ..text.tokenizer import save_tokenizer

    if dtype not in ("f32", "f16", "bf16"):
        raise ExportError(f"a Hugging Face export is f32, f16 or bf16, not {dtype!r} (quantized types go to GGUF)")
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    cfg: ModelConfig = model.config
    try:
        experts = hf_experts_config(cfg) if cfg.n_experts else {}
    except ValueError as e:
        raise ExportError(str(e)) from e
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for hf, t in hf_tensors(cfg, family_tensors(cfg, _weights(model), neox=cfg.family != "llama4")).items():
        tensors[hf] = t.to(torch_dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    head = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3", "llama4": "Llama4", "gpt-oss": "GptOss"}[cfg.family]
    config = {"architectures": [f"{head}ForCausalLM"], "model_type": cfg.family, "hidden_size": cfg.dim,
              "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
              "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
              "torch_dtype": str(torch_dtype).removeprefix("torch."), "attention_bias": cfg.qkv_bias, "mlp_bias": False}
    if cfg.family == "qwen2":
        config["use_sliding_window"] = False
    config.update(experts)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":  # (YaRN: gpt-oss's, hf_experts_config)
        r = cfg.rope_scaling
        config["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                                  "high_freq_factor": r.high_freq_factor,
                                  "original_max_position_embeddings": r.original_context}
    if tokenizer is not None:
        config["bos_token_id"], config["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
        config["pad_token_id"] = tokenizer.pad_id  # None unless the tokenizer has one (Phi-3's default is past tiny vocabularies)
        save_tokenizer(tokenizer, out)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


