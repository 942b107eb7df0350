"""Hugging Face directories (config.json, model.safetensors or a sharded index, tokenizer files): the
tensor-name table, the config read from config.json, and the loader."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from ..model.config import HF_FAMILIES, ModelConfig, RopeScaling
from ..text.tokenizer import tokenizer_from_hf_dir
from .build import build_model
from .layout import family_layout, meta_name, reverse_name
from .loaded import LoadedModel, ModelFileError


_HF_LAYER_NAMES = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",  # Qwen3
    "self_attn.qkv_proj": "attention.wqkv", "mlp.gate_up_proj": "feed_forward.w3",  # Phi-3's fused ones (family_layout)
    # Mixtures of experts: the router (Qwen-MoE's mlp.gate, Mixtral's block_sparse_moe.gate), Qwen2-MoE's shared
    # expert and its gate; the experts themselves are one tensor a projection here (stacked at load: _EXPERT)
    "mlp.gate": "feed_forward.gate", "block_sparse_moe.gate": "feed_forward.gate",
    "mlp.shared_expert.gate_proj": "feed_forward.shared.w1", "mlp.shared_expert.down_proj": "feed_forward.shared.w2",
    "mlp.shared_expert.up_proj": "feed_forward.shared.w3", "mlp.shared_expert_gate": "feed_forward.shared_gate",
    # Llama 4's feed-forward is named so: its router, shared expert and dense layers' projections
    "feed_forward.router": "feed_forward.gate", "feed_forward.shared_expert.gate_proj": "feed_forward.shared.w1",
    "feed_forward.shared_expert.down_proj": "feed_forward.shared.w2",
    "feed_forward.shared_expert.up_proj": "feed_forward.shared.w3", "feed_forward.gate_proj": "feed_forward.w1",
    "feed_forward.down_proj": "feed_forward.w2", "feed_forward.up_proj": "feed_forward.w3",
    "mlp.router": "feed_forward.gate",  # gpt-oss's (with a bias)
    "self_attn.sinks": "attention.sinks",  # gpt-oss's: written without the .weight (_hf_gpt_oss_tensors)
}
# One expert's projection: Qwen-MoE's mlp.experts.<e>.gate_proj, Mixtral's block_sparse_moe.experts.<e>.w1, ...
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "w1": "w1", "w2": "w2", "w3": "w3"}
# Llama 4's and gpt-oss's experts, fused: gate_up_proj (n_experts, dim, 2 * hidden), down_proj (n_experts, hidden,
# dim), and gpt-oss's biases; Llama 4's gate columns come before its up columns, gpt-oss's alternate with them
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.(?:feed_forward|mlp)\.experts\.(gate_up_proj|down_proj)(_bias)?")
_SINKS = re.compile(r"model\.layers\.(\d+)\.self_attn\.sinks")  # gpt-oss's, a vector without a suffix
# The text half of a Llama 4 checkpoint (Llama4ForConditionalGeneration): its tensors' prefix, and the rest's
_TEXT_PREFIX = "language_model."
_NOT_TEXT = ("vision_model.", "multi_modal_projector.")


_HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}


def hf_to_meta_name(name: str) -> str | None:
    return meta_name(name, _HF_NAMES, _HF_LAYER_NAMES, r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def meta_to_hf_name(name: str) -> str:
    """The Hugging Face name of a Meta-named weight or bias (the reverse of hf_to_meta_name)."""
    return reverse_name(name, _HF_NAMES, _HF_LAYER_NAMES, "model.layers.{i}.{name}.{kind}")


# A family's mixture-of-experts model in transformers: model_type, class name prefix
_HF_MOE = {"llama": ("mixtral", "Mixtral"), "qwen2": ("qwen2_moe", "Qwen2Moe"), "qwen3": ("qwen3_moe", "Qwen3Moe"),
           "llama4": ("llama4_text", "Llama4")}


def hf_tensors(cfg: ModelConfig, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-named tensors (in HF's RoPE layout already: layout.family_tensors) under Hugging Face's names, as
    the family's transformers class holds them: Phi-3's fused gate/up, Mixtral's and Qwen-MoE's experts one
    tensor each, Llama 4's feed-forward names and its experts fused and transposed."""
    out = {}
    if cfg.family == "gpt-oss":
        return _hf_gpt_oss_tensors(weights)
    for name, t in weights.items():
        m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.(?:experts\.(w[123])|gate)\.weight", name)
        if m is None or not cfg.n_experts:
            hf = meta_to_hf_name(name)
            if cfg.family == "phi3" and name.endswith("feed_forward.w3.weight"):
                hf = hf.replace("mlp.up_proj", "mlp.gate_up_proj")
            if cfg.family == "llama4":
                hf = hf.replace(".mlp.shared_expert.", ".feed_forward.shared_expert.").replace(".mlp.", ".feed_forward.")
            out[hf] = t
            continue
        i, proj = m.groups()
        base = f"model.layers.{i}.{'feed_forward' if cfg.family == 'llama4' else 'block_sparse_moe' if cfg.family == 'llama' else 'mlp'}"
        if proj is None:
            out[f"{base}.{'router' if cfg.family == 'llama4' else 'gate'}.weight"] = t
        elif cfg.family == "llama4":  # gate_up_proj (n_experts, dim, 2 * hidden), down_proj (n_experts, hidden, dim)
            if proj == "w2":
                out[f"{base}.experts.down_proj"] = t.transpose(1, 2)
            elif proj == "w1":
                up = weights[f"layers.{i}.feed_forward.experts.w3.weight"]
                out[f"{base}.experts.gate_up_proj"] = torch.cat([t, up], dim=1).transpose(1, 2)
        else:
            part = proj if cfg.family == "llama" else {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}[proj]
            out.update({f"{base}.experts.{e}.{part}.weight": t[e] for e in range(t.shape[0])})
    return out


def _hf_gpt_oss_tensors(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss's tensors under GptOssForCausalLM's names: its router mlp.router, its sinks without a suffix, its
    experts fused (gate and up columns alternating) and transposed, with their biases."""
    out = {}
    for name, t in weights.items():
        m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])\.(weight|bias)", name)
        if m is None:
            hf = meta_to_hf_name(name).replace(".mlp.gate.", ".mlp.router.")
            out[hf.removesuffix(".weight") if name.endswith("attention.sinks.weight") else hf] = t
            continue
        i, proj, kind = m.groups()
        base = f"model.layers.{i}.mlp.experts."
        suffix = "_bias" if kind == "bias" else ""
        if proj == "w2":
            out[f"{base}down_proj{suffix}"] = t if kind == "bias" else t.transpose(1, 2)
        elif proj == "w1":
            up = weights[f"layers.{i}.feed_forward.experts.w3.{kind}"]
            both = torch.stack([t, up], dim=2).flatten(1, 2)  # gate, up, gate, up, ... along the rows
            out[f"{base}gate_up_proj{suffix}"] = both if kind == "bias" else both.transpose(1, 2)
    return out


def hf_experts_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's keys for a mixture of experts (the reverse of _hf_experts); ValueError for what
    transformers' class of the family cannot hold."""
    model_type, head = _HF_MOE[cfg.family] if cfg.family in _HF_MOE else (None, None)
    mixtral = cfg.family == "llama"
    if cfg.family == "llama4":
        return _hf_llama4_config(cfg)
    if cfg.family == "gpt-oss":
        return _hf_gpt_oss_config(cfg)
    if (model_type is None or cfg.expert_router != "softmax" or (mixtral and (not cfg.expert_norm or cfg.dense_layers))
            or (cfg.family == "qwen2") != bool(cfg.shared_expert_dim and cfg.shared_expert_gate)):
        raise ValueError(f"this mixture of experts ({cfg.family} attention, {cfg.expert_router} router, "
                         f"shared expert {cfg.shared_expert_dim or 'none'}) matches no transformers model "
                         f"(MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM): export it to GGUF")
    out = {"architectures": [f"{head}ForCausalLM"], "model_type": model_type, "num_experts_per_tok": cfg.n_experts_used}
    if mixtral:
        return {**out, "num_local_experts": cfg.n_experts, "intermediate_size": cfg.expert_hidden_dim,
                "sliding_window": None}
    out.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.expert_hidden_dim, norm_topk_prob=cfg.expert_norm,
               decoder_sparse_step=1, mlp_only_layers=list(cfg.dense_layers))
    if cfg.shared_expert_dim:
        out["shared_expert_intermediate_size"] = cfg.shared_expert_dim
    return out


def _hf_llama4_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's keys for Llama 4's text model (the reverse of _hf_llama4)."""
    if (cfg.expert_router, cfg.expert_norm, cfg.expert_weight_input) != ("sigmoid", False, True) or (
            cfg.shared_expert_dim != cfg.expert_hidden_dim):
        raise ValueError("this Llama 4 routes its experts otherwise than Llama4ForCausalLM does: export it to GGUF")
    return {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.n_experts_used, "intermediate_size": cfg.expert_hidden_dim,
            "intermediate_size_mlp": cfg.hidden_dim, "moe_layers": [i for i in range(cfg.n_layers) if cfg.moe_layer(i)],
            "no_rope_layers": [int(cfg.rope_layer(i)) for i in range(cfg.n_layers)],
            "no_rope_layer_interval": cfg.nope_layer_step or cfg.n_layers + 1,
            "attention_chunk_size": cfg.attention_chunk or None, "use_qk_norm": cfg.qk_l2_norm,
            "attn_temperature_tuning": bool(cfg.attn_temp_floor), "floor_scale": cfg.attn_temp_floor or 8192,
            "attn_scale": cfg.attn_temp_scale}


def _hf_gpt_oss_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's keys for gpt-oss (the reverse of _hf_gpt_oss)."""
    r = cfg.rope_scaling
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta} if r is None else {
        "rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": r.factor, "beta_fast": r.beta_fast,
        "beta_slow": r.beta_slow, "original_max_position_embeddings": r.original_context, "truncate": r.truncate}
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.n_experts_used, "intermediate_size": cfg.expert_hidden_dim,
            "attention_bias": cfg.qkv_bias, "sliding_window": cfg.sliding_window or None,
            "layer_types": ["sliding_attention" if cfg.window_layer(i) else "full_attention" for i in range(cfg.n_layers)],
            "rope_parameters": rope, "swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha}


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
    weights, experts = {}, {}
    for fname in files:
        if not (path / fname).exists():
            raise ModelFileError(f"{path / fname} is named in the index but missing: download it again")
        with safe_open(path / fname, framework="pt") as f:
            for name in f.keys():
                if name.startswith(_NOT_TEXT):
                    continue  # a multimodal checkpoint's vision half: llamalite runs the text
                tensor_name, name = name, name.removeprefix(_TEXT_PREFIX)
                m = _FUSED_EXPERTS.fullmatch(name)
                if m:
                    t, p = f.get_tensor(tensor_name), f"layers.{m.group(1)}.feed_forward.experts."
                    kind = "bias" if m.group(3) else "weight"
                    t = t if m.group(3) else t.transpose(1, 2)  # weights to (n_experts, out, in)
                    if m.group(2) == "down_proj":
                        weights[f"{p}w2.{kind}"] = t.contiguous()
                    elif cfg.family == "gpt-oss":  # gate and up rows alternate
                        weights[f"{p}w1.{kind}"], weights[f"{p}w3.{kind}"] = t[:, 0::2].contiguous(), t[:, 1::2].contiguous()
                    else:  # gate rows, then up rows
                        weights[f"{p}w1.{kind}"], weights[f"{p}w3.{kind}"] = (h.contiguous() for h in t.chunk(2, dim=1))
                    continue
                m = _SINKS.fullmatch(name)
                if m:
                    weights[f"layers.{m.group(1)}.attention.sinks.weight"] = f.get_tensor(tensor_name)
                    continue
                m = _EXPERT.fullmatch(name)
                if m and m.group(3) in _EXPERT_NAMES:
                    key = f"layers.{m.group(1)}.feed_forward.experts.{_EXPERT_NAMES[m.group(3)]}.weight"
                    experts.setdefault(key, {})[int(m.group(2))] = f.get_tensor(tensor_name)
                    continue
                meta_name = hf_to_meta_name(name)
                if meta_name is None:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ModelFileError(f"{path / fname}: tensor {name!r} is not part of a llama model")
                weights[meta_name] = f.get_tensor(tensor_name)
    for key, each in experts.items():  # one (n_experts, out, in) tensor a projection, in the experts' order
        if sorted(each) != list(range(cfg.n_experts)):
            raise ModelFileError(f"{path}: {key.removesuffix('.weight')} has experts {sorted(each)[:8]}..., not the "
                                 f"{cfg.n_experts} experts 0..{cfg.n_experts - 1} config.json names")
        weights[key] = torch.stack([each[e] for e in range(cfg.n_experts)])
    family_layout(cfg, weights, {}, neox=cfg.family != "llama4")  # HF rotates half-split pairs, but Llama 4 Meta's
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


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Read a Hugging Face `config.json` dict of the LLaMA lineage: LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, and the mixtures of experts MixtralForCausalLM,
    Qwen2MoeForCausalLM, Qwen3MoeForCausalLM."""
    arch = cfg.get("model_type", "llama")
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    if quant:
        raise ValueError(f"its weights are quantized ({quant}), which llamalite reads from GGUF files only: "
                         f"use the model's GGUF file")
    if arch == "llama4":  # the multimodal checkpoint: its text model's config
        cfg, arch = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}, "llama4_text"
    if arch not in HF_FAMILIES:
        raise ValueError(f"config.json has model_type {arch!r}; llamalite runs {', '.join(HF_FAMILIES)}")
    family = HF_FAMILIES[arch]
    scaling = cfg.get("rope_scaling") or None
    rope_theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if scaling is None and (cfg.get("rope_parameters") or {}).get("rope_type") not in (None, "default"):
        scaling = cfg["rope_parameters"]
    rope = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            rope = RopeScaling(scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                               scaling["original_max_position_embeddings"])
        elif kind not in (None, "default") and not (kind == "yarn" and arch == "gpt_oss"):  # (gpt-oss's: _hf_gpt_oss)
            raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor {cfg['partial_rotary_factor']} (RoPE on part of each head) is not "
                         f"supported")
    n_heads = cfg["num_attention_heads"]
    context = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch not in ("qwen2", "qwen2_moe")) else None
    if window and arch == "gpt_oss":  # windows on some layers, attended as such (_hf_gpt_oss)
        window = None
    if window:  # beyond its window the model attends to a part of the context: llamalite stops short of it
        context = min(context, int(window))
    fields = dict(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope,
        context_length=context,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        family=family,
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3",
    )
    return ModelConfig(**{**fields, **_hf_experts(cfg, arch), **_hf_llama4(cfg, arch), **_hf_gpt_oss(cfg, arch)})


def _hf_gpt_oss(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """gpt-oss's fields: sinks, biases, windowed layers, YaRN, its experts (none for the other families)."""
    if arch != "gpt_oss":
        return {}
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    windowed = [t == "sliding_attention" for t in types]
    pattern = next((p for p in range(1, n + 2) if windowed == [(i + 1) % p != 0 for i in range(n)]), None)
    if pattern is None:
        raise ValueError(f"layer_types {types} is not a full-attention layer in every few")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "yarn":
        scaling = RopeScaling(factor=float(rope["factor"]), original_context=int(rope["original_max_position_embeddings"]),
                              kind="yarn", beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                              truncate=bool(rope.get("truncate", True)))
        if rope.get("attention_factor") is not None or rope.get("mscale") or rope.get("mscale_all_dim"):
            raise ValueError("YaRN with its own attention_factor or mscale is not supported")
    bias = bool(cfg.get("attention_bias", True))
    return dict(qkv_bias=bias, o_bias=bias, attention_sinks=True, sliding_window=int(cfg.get("sliding_window") or 0),
                sliding_window_pattern=pattern if any(windowed) else 0, rope_scaling=scaling,
                n_experts=cfg["num_local_experts"], n_experts_used=cfg["num_experts_per_tok"],
                expert_hidden_dim=cfg["intermediate_size"], router_bias=True, expert_bias=True,
                swiglu_limit=float(cfg.get("swiglu_limit", 7.0)), swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)))


def _hf_llama4(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """Llama 4's attention and feed-forward fields (none for the other families)."""
    if arch != "llama4_text":
        return {}
    n, step = cfg["num_hidden_layers"], cfg.get("interleave_moe_layer_step", 1)
    moe = cfg.get("moe_layers")
    moe = set(range(step - 1, n, step) if moe is None else moe)
    rope = cfg.get("no_rope_layers") or [int((i + 1) % cfg.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    nope = [i for i in range(n) if not rope[i]]
    interval = (nope[0] + 1) if nope else 0
    if nope != list(range(interval - 1, n, interval or 1))[:len(nope)] or (nope and len(nope) != n // interval):
        raise ValueError(f"no_rope_layers {rope} is not one layer in every few")
    return dict(hidden_dim=cfg.get("intermediate_size_mlp", cfg["intermediate_size"]), n_experts=cfg["num_local_experts"],
                n_experts_used=cfg["num_experts_per_tok"], expert_hidden_dim=cfg["intermediate_size"],
                expert_router="sigmoid", expert_norm=False, expert_weight_input=True,
                shared_expert_dim=cfg["intermediate_size"], dense_layers=tuple(i for i in range(n) if i not in moe),
                nope_layer_step=interval, attention_chunk=int(cfg.get("attention_chunk_size") or 0),
                qk_l2_norm=bool(cfg.get("use_qk_norm", True)),
                attn_temp_floor=int(cfg.get("floor_scale", 8192)) if cfg.get("attn_temperature_tuning", True) else 0,
                attn_temp_scale=float(cfg.get("attn_scale", 0.1)))


def _hf_experts(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from a config.json (none for a dense model)."""
    n = cfg.get("num_local_experts", cfg.get("num_experts")) or 0
    if arch not in ("mixtral", "qwen2_moe", "qwen3_moe") or not n:
        return {}
    if arch == "mixtral":
        return dict(n_experts=n, n_experts_used=cfg["num_experts_per_tok"], expert_hidden_dim=cfg["intermediate_size"])
    step = cfg.get("decoder_sparse_step", 1) or 1
    only_dense = set(cfg.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(cfg["num_hidden_layers"]) if i in only_dense or (i + 1) % step)
    shared = cfg.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0
    return dict(n_experts=n, n_experts_used=cfg["num_experts_per_tok"], expert_hidden_dim=cfg["moe_intermediate_size"],
                expert_norm=bool(cfg.get("norm_topk_prob", False)), shared_expert_dim=shared,
                shared_expert_gate=bool(shared), dense_layers=dense)
