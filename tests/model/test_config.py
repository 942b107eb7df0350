import json

import pytest
import torch

from llamalite.model.config import PRESETS, ModelConfig

from llamalite.formats.hf import config_from_hf

from llamalite.formats.meta import config_from_meta
from llamalite.model.transformer import Transformer

# Published parameter counts (papers, model cards) in billions; the tolerance covers their rounding.
PUBLISHED = {
    "llama-7b": 6.7, "llama-13b": 13.0, "llama-33b": 32.5, "llama-65b": 65.2,
    "llama2-7b": 6.7, "llama2-13b": 13.0, "llama2-70b": 69.0,
    "llama3-8b": 8.03, "llama3-70b": 70.6,
    "llama3.1-8b": 8.03, "llama3.1-70b": 70.6, "llama3.1-405b": 405.9,
    "llama3.2-1b": 1.24, "llama3.2-3b": 3.21,
    "smollm2-135m": 0.1345, "smollm2-360m": 0.3618, "smollm2-1.7b": 1.711,
    # model cards: Mistral 7B v0.3 7.25B; Qwen2.5 0.49B, 1.54B, 7.61B; Qwen3 0.6B, 1.7B, 4.0B, 8.2B; Phi-3-mini 3.8B
    "mistral-7b": 7.25, "qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.61,
    "qwen3-0.6b": 0.596, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19, "phi3-mini-4k": 3.82,
    # mixtures of experts, total: Mixtral 8x7B 46.7B; Qwen3 30.5B, 235B; Qwen1.5-MoE 14.3B
    "mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5, "qwen3-235b-a22b": 235.0, "qwen1.5-moe-a2.7b": 14.3,
    "llama4-scout": 109.0, "llama4-maverick": 400.0,  # Meta's figures, rounded, with the vision encoder (about 1B)
    "gpt-oss-20b": 20.9, "gpt-oss-120b": 116.8,  # OpenAI's model card
}
# ... and active a token (model cards; Mixtral: Jiang et al. 2024, 12.9B)
ACTIVE = {"mixtral-8x7b": 12.9, "qwen3-30b-a3b": 3.3, "qwen3-235b-a22b": 22.0, "qwen1.5-moe-a2.7b": 2.7,
          "llama4-scout": 17.0, "llama4-maverick": 17.0,
          # OpenAI's 3.6B and 5.1B leave out the embedding table (201088 x 2880: 0.58B); ours count it, as the others do
          "gpt-oss-20b": 3.6 + 0.58, "gpt-oss-120b": 5.1 + 0.58}


def test_every_preset_has_a_published_figure():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset(name))
    n = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert n / 1e9 == pytest.approx(PUBLISHED[name], rel=0.012 if name.startswith("llama4") else 0.006)
    total, active = model.config.parameter_counts()
    assert total == n
    assert active / 1e9 == pytest.approx(ACTIVE.get(name, PUBLISHED[name]), rel=0.02)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown preset 'llama-8b'; known: llama-7b"):
        ModelConfig.from_preset("llama-8b")


def test_meta_ffn_size_derivation():
    # Meta's params.json gives multiple_of / ffn_dim_multiplier, not the hidden size itself.
    assert ModelConfig.from_preset("llama-7b").hidden_dim == 11008
    assert ModelConfig.from_preset("llama2-70b").hidden_dim == 28672
    assert ModelConfig.from_preset("llama3-8b").hidden_dim == 14336


def test_config_from_hf_reads_llama3_rope_scaling():
    hf = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": 128256, "intermediate_size": 8192, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
          "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    cfg = config_from_hf(hf)
    assert cfg == ModelConfig.from_preset("llama3.2-1b", norm_eps=1e-5)


def test_config_from_meta_params_json():
    params = json.loads('{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, '
                        '"norm_eps": 1e-06, "vocab_size": -1}')
    cfg = config_from_meta(params, vocab_size=32000)
    assert (cfg.hidden_dim, cfg.vocab_size, cfg.n_kv_heads) == (11008, 32000, 32)
    with pytest.raises(ValueError, match="tokenizer.model"):
        config_from_meta(params)


def test_config_rejects_other_architectures():
    with pytest.raises(ValueError, match="model_type 'gpt_neox'; llamalite runs llama, mistral, qwen2"):
        config_from_hf({"model_type": "gpt_neox"})
