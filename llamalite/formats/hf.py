"""Hugging Face directories (config.json, model.safetensors or a sharded index, tokenizer files): the
tensor-name table, the config read from config.json, and the loader."""

from __future__ import annotations

import json
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
}


_HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}


def hf_to_meta_name(name: str) -> str | None:
    return meta_name(name, _HF_NAMES, _HF_LAYER_NAMES, r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def meta_to_hf_name(name: str) -> str:
    """The Hugging Face name of a Meta-named weight or bias (the reverse of hf_to_meta_name)."""
    return reverse_name(name, _HF_NAMES, _HF_LAYER_NAMES, "model.layers.{i}.{name}.{kind}")


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


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Read a Hugging Face `config.json` dict of the LLaMA lineage: LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM."""
    arch = cfg.get("model_type", "llama")
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
        elif kind not in (None, "default"):
            raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor {cfg['partial_rotary_factor']} (RoPE on part of each head) is not "
                         f"supported")
    n_heads = cfg["num_attention_heads"]
    context = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch != "qwen2") else None
    if window:  # beyond its window the model attends to a part of the context: llamalite stops short of it
        context = min(context, int(window))
    return ModelConfig(
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
