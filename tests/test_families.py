"""The LLaMA lineage beyond LLaMA: Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm), Phi-3 (fused projections)
and Mistral (the llama architecture), as configuration of the one model file. Tiny random models built
with transformers: their logits and greedy tokens from llamalite's Hugging Face loader, from its GGUF
export (f32, and q8_0 on the kernels) and through llama.cpp's reading of that export; the Hugging Face
export read back by transformers; chat templates and end-of-turn tokens; the errors."""

import subprocess
import sys

import pytest
import torch

from llamalite.formats.load import load
from tests.helpers import (check_batched_equals_alone, check_hf_export_reads_back, check_llamacpp_reads_our_gguf,
                           llamalite_run, save_hf_dir, transformers_run)

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=400, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
              rope_theta=10000.0)
FAMILIES = {  # HF model_type -> (config and model classes, extra config, llamalite's family)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}, "qwen3"),  # head_dim apart from hidden/heads
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, "phi3"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, "llama"),
}
IDS = [5, 17, 99, 3, 250, 77, 12, 8, 300, 41]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """model_type -> (the transformers model, its saved directory)."""
    out = {}
    for kind, (config_cls, model_cls, extra, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).float().eval()
        with torch.no_grad():  # norms and biases away from their initial 1 and 0, so that a test sees them
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                elif "bias" in name:
                    p.normal_(0, 0.5)
        out[kind] = (model, save_hf_dir(model, tmp_path_factory.mktemp(kind)))
    return out


def _reference(model, ids=IDS):
    return transformers_run(model, ids)


def _ours(lm, ids=IDS):
    return llamalite_run(lm, ids)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_hugging_face_checkpoint(models, kind):
    model, path = models[kind]
    lm = load(path)
    assert lm.config.family == FAMILIES[kind][3]
    want, want_tokens = _reference(model)
    got, tokens = _ours(lm)
    assert float((got - want).abs().max()) < 1e-4
    assert tokens == want_tokens


@pytest.mark.parametrize("kind", FAMILIES)
def test_our_gguf_export_reads_back(models, kind, tmp_path):
    """f32: transformers' logits and tokens; q8_0 (the kernels, with biases and q/k norms in their step):
    within the rounding, and its cached decode gives its own full forward's greedy tokens."""
    from llamalite.formats.export import export_gguf

    model, path = models[kind]
    lm = load(path)
    want, want_tokens = _reference(model)
    f32 = load(export_gguf(lm.model, lm.tokenizer, tmp_path / "f32.gguf", dtype="f32"))
    got, tokens = _ours(f32)
    assert float((got - want).abs().max()) < 1e-4 and tokens == want_tokens
    q8 = load(export_gguf(lm.model, lm.tokenizer, tmp_path / "q8.gguf", dtype="q8_0"))
    got, tokens = _ours(q8)
    assert float((got - want).abs().max() / want.abs().max()) < 2e-2
    seq = list(IDS)
    with torch.no_grad():
        for _ in range(12):  # greedy by full forwards, no cache at all
            seq.append(int(q8.model(torch.tensor([seq]))[0, -1].argmax()))
    assert tokens[:12] == seq[len(IDS):]
    m = q8.model  # the kernels' one-call step (DecodePlan, with the biases and head norms) is the layers' step
    assert m.plan is not None
    m.setup_caches(1, 128, "f32")
    with torch.no_grad():
        m(torch.tensor([IDS]), torch.arange(len(IDS)))
        one_call = m(torch.tensor([[7]]), torch.tensor([len(IDS)]))[0, -1]
        plan, m.plan = m.plan, None
        by_layers = m(torch.tensor([[7]]), torch.tensor([len(IDS)]))[0, -1]
        m.plan = plan
    # the same kernels in both (SiLU included: PyTorch's own exp rounded otherwise, 1e-5 apart on an Intel host);
    # RoPE's rotations from one table: exactly equal on the AVX-512 EPYC host, a margin for a last ulp of cos/sin
    assert float((one_call - by_layers).abs().max()) <= 1e-6 * float(by_layers.abs().max())


@pytest.mark.parametrize("kind", FAMILIES)
def test_llamacpp_reads_our_gguf_as_we_do(models, kind, tmp_path):
    pytest.importorskip("llama_cpp", reason="the peer: pip install -e '.[peer]'")
    model, path = models[kind]
    check_llamacpp_reads_our_gguf(model, load(path), tmp_path, IDS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_our_hugging_face_export_reads_back_in_transformers(models, kind, tmp_path):
    model, path = models[kind]
    check_hf_export_reads_back(model, load(path), tmp_path, IDS, "LlamaForCausalLM" if kind == "mistral" else type(model).__name__)


TEMPLATES = {
    "chatml (Qwen)": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                      "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                      "{% endif %}", "<|im_end|>"),
    "phi-3": ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
              "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
              "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
              "{% endif %}", "<|end|>"),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_templates_and_end_of_turn_tokens(models, name, tmp_path):
    """The family's template renders as transformers' apply_chat_template does, and its end-of-turn token
    ends a reply."""
    import json

    from llamalite.text.chat_template import render_chat

    template, end = TEMPLATES[name]
    model, path = models["qwen2"]
    (tmp_path / "m").mkdir()
    for f in path.iterdir():
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    tokenizer_json = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"].append({"id": 399, "content": end, "single_word": False, "lstrip": False,
                                           "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    lm = load(tmp_path / "m")
    assert render_chat(lm.chat_template, lm.tokenizer, messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert lm.tokenizer.token_id(end) in lm.tokenizer.end_ids


def test_the_verbs_on_a_qwen3_gguf(models, tmp_path):
    from llamalite.formats.export import export_gguf

    model, path = models["qwen3"]
    lm = load(path)
    gguf = str(export_gguf(lm.model, lm.tokenizer, tmp_path / "q.gguf", dtype="q8_0"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "llamalite", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300)
    for args in (["generate", "--model", gguf, "-t", "0", "-n", "8", "hello"],
                 ["bench", "--model", gguf, "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8"],
                 ["info", "--model", gguf],
                 ["export", gguf, "--to", "hf", "--out", str(tmp_path / "back")]):
        out = run(*args)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    assert "qwen3" in run("info", "--model", gguf).stdout


def test_what_is_not_supported_says_so(tmp_path):
    from llamalite.formats.hf import config_from_hf

    with pytest.raises(ValueError, match="model_type 'gemma'.*llama, mistral, qwen2, qwen3, phi3"):
        config_from_hf({"model_type": "gemma"})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        config_from_hf({**COMMON, "model_type": "phi3", "partial_rotary_factor": 0.75, "vocab_size": 400})
    # a sliding window bounds the context the model runs at
    assert config_from_hf({**COMMON, "model_type": "mistral", "sliding_window": 64}).context_length == 64


def test_the_batching_engine_serves_them(models, tmp_path):
    """Qwen3 on the kernels in the server's engine: requests decoded together give what generate gives."""
    from llamalite.formats.export import export_gguf

    model, path = models["qwen3"]
    lm = load(export_gguf(load(path).model, load(path).tokenizer, tmp_path / "q.gguf", dtype="q8_0"))
    check_batched_equals_alone(lm.model, [IDS, IDS[3:] + [1, 2], [9, 8, 7]])
