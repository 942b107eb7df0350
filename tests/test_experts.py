"""Mixtures of experts (Mixtral, Qwen3-MoE, Qwen2-MoE with its gated shared expert, Llama 4 with its NoPE,
chunked and L2-normed attention, gpt-oss with its sinks, windows, biases and YaRN) as configuration of the one
model file. Tiny random models built with transformers: logits and greedy tokens from the Hugging Face loader
and from our GGUF export (f32, and q8_0 with the experts on the kernels and in the one-call decode step),
llama.cpp reading that export, the Hugging Face export read back by transformers, batched decoding equal to
alone, parameter counts, routing's edge cases and the errors."""

import pytest
import torch

from llamalite.formats.load import load
from tests.helpers import (check_batched_equals_alone, check_hf_export_reads_back, check_llamacpp_reads_our_gguf,
                           llamacpp_logits, llamalite_run, save_hf_dir, transformers_run)

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=400,
              intermediate_size=64, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
FAMILIES = {  # name -> (config and model classes, extra config, llamalite's family)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                             sliding_window=None), "llama"),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=8, num_experts_per_tok=3, head_dim=32,
                                                               moe_intermediate_size=32, norm_topk_prob=True), "qwen3"),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=8, num_experts_per_tok=2,
                                                               moe_intermediate_size=32,
                                                               shared_expert_intermediate_size=96), "qwen2"),
    # 4 layers: the last without RoPE; experts in layers 1 and 3, dense feed-forwards of their own size in 0 and 2
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(num_hidden_layers=4, num_local_experts=4, head_dim=16,
                                                             num_experts_per_tok=1, intermediate_size=32,
                                                             intermediate_size_mlp=96, interleave_moe_layer_step=2),
               "llama4"),
    # sinks, biases everywhere, YaRN, a window of 6 on layers 0 and 2 (past it within the 10-token prompt), the
    # clamped SwiGLU
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_hidden_layers=4, num_local_experts=4, head_dim=16,
                                                          num_experts_per_tok=2, intermediate_size=32, sliding_window=6),
                "gpt-oss"),
}
IDS = [5, 17, 99, 3, 250, 77, 12, 8, 300, 41]


def _build(kind, **overrides):
    config_cls, model_cls, extra, _ = FAMILIES[kind]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides}))
    model = model.float().eval()
    with torch.no_grad():  # norms and biases away from 1 and 0; routers sharp enough that choices differ per token
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name or "sinks" in name:
                p.normal_(0, 0.5 if kind != "gpt-oss" else 0.05)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight",
                                "router.weight")):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {kind: (m := _build(kind), save_hf_dir(m, tmp_path_factory.mktemp(kind))) for kind in FAMILIES}


def _reference(model, ids=IDS):
    return transformers_run(model, ids)


def _ours(lm, ids=IDS):
    return llamalite_run(lm, ids)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_hugging_face_checkpoint(models, kind):
    model, path = models[kind]
    lm = load(path)
    assert lm.config.family == FAMILIES[kind][3] and lm.config.n_experts > 0
    want, want_tokens = _reference(model)
    got, tokens = _ours(lm)
    assert float((got - want).abs().max()) < 1e-4
    assert tokens == want_tokens
    total, active = lm.config.parameter_counts()
    assert total == sum(p.numel() for p in model.parameters()) and active < total


@pytest.mark.parametrize("kind", FAMILIES)
def test_our_gguf_export_reads_back(models, kind, tmp_path):
    """f32: transformers' logits and tokens. q8_0: the experts stay in blocks (one kernel call a layer, rows
    grouped by expert), within the rounding; the cached decode gives its own full forward's greedy tokens,
    and the one-call decode step (DecodePlan, with the router, experts and shared expert) is the layers' step."""
    from llamalite.formats.export import export_gguf
    from llamalite.runtime.quantized import FastExperts

    model, path = models[kind]
    lm = load(path)
    want, want_tokens = _reference(model)
    f32 = load(export_gguf(lm.model, lm.tokenizer, tmp_path / "f32.gguf", dtype="f32"))
    assert f32.config.n_experts == lm.config.n_experts and f32.config.expert_norm == lm.config.expert_norm
    got, tokens = _ours(f32)
    assert float((got - want).abs().max()) < 1e-4 and tokens == want_tokens
    q8 = load(export_gguf(lm.model, lm.tokenizer, tmp_path / "q8.gguf", dtype="q8_0"))
    experts = q8.model.layers[-1].feed_forward.experts
    assert isinstance(experts, FastExperts) and experts.w1.type_name == "Q8_0"
    assert experts.fused  # (gpt-oss's biases and clamped SwiGLU too)
    got, tokens = _ours(q8)
    assert float((got - want).abs().max() / want.abs().max()) < 3e-2
    seq = list(IDS)
    with torch.no_grad():
        for _ in range(12):  # greedy by full forwards, no cache at all
            seq.append(int(q8.model(torch.tensor([seq]))[0, -1].argmax()))
    assert tokens[:12] == seq[len(IDS):]
    m = q8.model
    assert m.plan is not None
    m.setup_caches(1, 128, "f32")
    with torch.no_grad():
        m(torch.tensor([IDS]), torch.arange(len(IDS)))
        one_call = m(torch.tensor([[7]]), torch.tensor([len(IDS)]))[0, -1]
        plan, m.plan = m.plan, None
        by_layers = m(torch.tensor([[7]]), torch.tensor([len(IDS)]))[0, -1]
        m.plan = plan
    # Llama 4's and gpt-oss's layers step through PyTorch's attention (its exp rounds otherwise than the kernels'); the
    # others' through the kernels' attention op, as the step does
    bound = 1e-4 if kind in ("llama4", "gpt-oss") else 1e-5
    assert float((one_call - by_layers).abs().max()) <= bound * float(by_layers.abs().max())


@pytest.mark.parametrize("kind", FAMILIES)
def test_llamacpp_reads_our_gguf_as_we_do(models, kind, tmp_path):
    pytest.importorskip("llama_cpp", reason="the peer: pip install -e '.[peer]'")
    model, path = models[kind]
    check_llamacpp_reads_our_gguf(model, load(path), tmp_path, IDS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_our_hugging_face_export_reads_back_in_transformers(models, kind, tmp_path):
    model, path = models[kind]
    check_hf_export_reads_back(model, load(path), tmp_path, IDS, type(model).__name__)


def test_llama4_chunks_and_temperature(tmp_path):
    """Llama 4's chunked attention and its NoPE layers' temperature tuning where they bite: chunks of 4
    positions and a temperature floor of 3 over a 14-token prompt and 20 tokens decoded from the cache
    (transformers' logits and greedy tokens); the chunked layers past the first chunk, and the NoPE layer,
    step layer by layer."""
    from llamalite.formats.export import export_gguf

    model = _build("llama4", attention_chunk_size=4, floor_scale=3, num_experts_per_tok=2)
    lm = load(save_hf_dir(model, tmp_path / "m"))
    assert (lm.config.attention_chunk, lm.config.attn_temp_floor, lm.config.nope_layer_step) == (4, 3, 4)
    ids = IDS + [7, 9, 11, 13]
    want, want_tokens = _reference(model, ids)
    got, tokens = _ours(lm, ids)
    assert float((got - want).abs().max()) < 1e-4 and tokens == want_tokens
    # the kernels' one-call step (chunk starts, the NoPE layer's temperature, L2 norms, experts weighted on
    # their input) against the layers' step of a q8_0 model, over positions far past the first chunk. GGUF
    # holds llama.cpp's fixed chunks of 8192: the loaded layers take these small ones, and a new step is planned.
    from llamalite.runtime.quantized import FastTransformer

    default = _build("llama4", num_experts_per_tok=2)
    m = load(export_gguf(load(save_hf_dir(default, tmp_path / "d")).model, lm.tokenizer, tmp_path / "q8.gguf",
                         dtype="q8_0")).model
    for layer in m.layers:
        a = layer.attention
        a.chunk, a.temperature = (4, None) if a.rope else (0, (3, 0.1))
    m = FastTransformer.replacing(m)
    assert m.plan is not None
    m.setup_caches(1, 64, "f32")
    with torch.no_grad():
        m(torch.tensor([ids]), torch.arange(len(ids)))
        for pos in range(len(ids), len(ids) + 20):
            token = torch.tensor([[pos * 7 % 400]])
            one_call = m(token, torch.tensor([pos]))[0, -1]
            plan, m.plan = m.plan, None
            by_layers = m(token, torch.tensor([pos]))[0, -1]  # (writes the same keys and values again)
            m.plan = plan
            # (these layers step through PyTorch's attention, whose exp rounds otherwise than the kernels', and
            # the int16 activations can round the other way behind that: 1e-4, where a wrong chunk start, a
            # missed temperature or norm moves logits by 1e-2 and more)
            assert float((one_call - by_layers).abs().max()) <= 1e-4 * float(by_layers.abs().max()), pos


def test_llama4_context_shift(models):
    """A context shift turns back the RoPE layers' cached keys and moves the NoPE layer's as they are (they
    were never turned)."""
    lm = load(models["llama4"][1])
    m, ids = lm.model, IDS + [7, 9, 11, 13]
    m.setup_caches(1, 64, "f32")
    with torch.no_grad():
        m(torch.tensor([ids]), torch.arange(len(ids)))
        before = [layer.attention.cache.k[0, :, 6:len(ids)].clone() for layer in m.layers]
        m.shift_caches(keep=2, discard=4, end=len(ids))
    for layer, k in zip(m.layers, before):
        moved = layer.attention.cache.k[0, :, 2:len(ids) - 4]
        assert torch.equal(moved, k) == (not layer.attention.rope)
        assert torch.allclose(moved.norm(dim=-1), k.norm(dim=-1), atol=1e-5)  # turned, not changed


def test_dense_layers_among_the_experts(tmp_path):
    """Qwen-MoE's mlp_only_layers and decoder_sparse_step: those layers keep a dense feed-forward of
    intermediate_size. GGUF has no place for them in llama.cpp's qwen3moe: that export is refused."""
    from llamalite.formats.export import ExportError, export_gguf

    model = _build("qwen3moe", num_hidden_layers=3, mlp_only_layers=[1])
    lm = load(save_hf_dir(model, tmp_path / "m"))
    assert lm.config.dense_layers == (1,)
    from llamalite.model.transformer import FeedForward, MoEFeedForward

    assert isinstance(lm.model.layers[1].feed_forward, FeedForward)
    assert isinstance(lm.model.layers[0].feed_forward, MoEFeedForward)
    want, want_tokens = _reference(model)
    got, tokens = _ours(lm)
    assert float((got - want).abs().max()) < 1e-4 and tokens == want_tokens
    with pytest.raises(ExportError, match=r"layers \[1\] have a dense feed-forward.*--to hf"):
        export_gguf(lm.model, lm.tokenizer, tmp_path / "x.gguf")


def test_batched_decoding_equals_alone(models, tmp_path):
    """Requests of different lengths decoded together in the server's engine: what each gives alone (the
    experts on the kernels, several rows choosing different experts in one step)."""
    from llamalite.formats.export import export_gguf

    model, path = models["qwen3moe"]
    lm = load(export_gguf(load(path).model, load(path).tokenizer, tmp_path / "q.gguf", dtype="q8_0"))
    check_batched_equals_alone(lm.model, [IDS, IDS[3:] + [1, 2], [9, 8, 7]])


def test_routing_edges():
    """Ties go to the lower expert id; top-k of all experts; softmax weights rescaled or not; the sigmoid
    router weighs each chosen expert by its own logit."""
    from llamalite.model.transformer import route

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    w, ids = route(logits, 2, "softmax", norm=True)
    assert ids.tolist() == [[1, 2], [0, 1]] and torch.allclose(w, torch.full((2, 2), 0.5))
    w, ids = route(logits, 4, "softmax", norm=False)
    assert torch.allclose(w.sum(-1), torch.ones(2)) and sorted(ids[0].tolist()) == [0, 1, 2, 3]
    w, ids = route(logits, 1, "softmax", norm=False)
    assert ids[:, 0].tolist() == [1, 0] and abs(float(w[1, 0]) - 0.25) < 1e-6
    w, ids = route(logits, 1, "sigmoid", norm=False)
    assert abs(float(w[0, 0]) - float(torch.sigmoid(torch.tensor(3.0)))) < 1e-6


def test_what_is_not_supported_says_so(models, tmp_path):
    from llamalite.formats.export import ExportError, export_gguf
    from llamalite.formats.hf import config_from_hf
    from llamalite.formats.gguf import config_from_gguf

    with pytest.raises(ValueError, match="model_type 'deepseek_v3'.*mixtral"):
        config_from_hf({"model_type": "deepseek_v3"})
    with pytest.raises(ValueError, match="architecture 'deepseek2' is not supported.*qwen3moe"):
        config_from_gguf({"general.architecture": "deepseek2"}, has_output=True)
    with pytest.raises(ValueError, match="n_experts_used"):
        config_from_hf({**COMMON, **FAMILIES["mixtral"][2], "model_type": "mixtral", "num_experts_per_tok": 5})
    # llama.cpp's qwen3moe always rescales the chosen weights: a model that does not cannot go there
    lm = load(save_hf_dir(_build("qwen3moe", norm_topk_prob=False), tmp_path / "m"))
    with pytest.raises(ExportError, match="qwen3moe architecture weighs the chosen experts.*--to hf"):
        export_gguf(lm.model, lm.tokenizer, tmp_path / "x.gguf")


def test_the_verbs_on_a_mixture_of_experts(models, tmp_path):
    """generate, bench, info (total and active parameters, the bytes a token reads), embed, eval, export, and a
    LoRA fine-tune of the attention and the experts (the routers frozen) whose merged export reads back (its
    adapter alone has no PEFT layout for fused experts: refused)."""
    import json
    import subprocess
    import sys

    from llamalite.formats.export import export_gguf
    from llamalite.train.config import FinetuneConfig
    from llamalite.train.finetune import finetune

    model, path = models["qwen3moe"]
    lm = load(path)
    gguf = str(export_gguf(lm.model, lm.tokenizer, tmp_path / "q.gguf", dtype="q8_0"))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    run = lambda *a: subprocess.run([sys.executable, "-m", "llamalite", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300)
    for args in (["generate", "--model", gguf, "-t", "0", "-n", "8", "hello"],
                 ["bench", "--model", gguf, "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8"],
                 ["embed", "--model", gguf, "hello there"],
                 ["eval", "perplexity", str(text), "--model", gguf, "--ctx", "32", "--json"],
                 ["export", gguf, "--to", "hf", "--out", str(tmp_path / "back")]):
        out = run(*args)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    info = json.loads(run("info", "--model", gguf, "--json").stdout)
    total, active = lm.config.parameter_counts()
    assert (info["parameters"], info["active_parameters"], info["experts"], info["experts_per_token"]) == (
        total, active, 8, 3)
    assert 0 < info["weight_bytes_per_token"] < (tmp_path / "q.gguf").stat().st_size
    assert load(tmp_path / "back").config.n_experts == 8

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the corpus"}) + "\n" for i in range(8)))
    common = dict(model=gguf, data=str(data), steps=2, batch_size=2, lr=1e-2, eval_every=2, save_every=2,
                  val_every=2, lora_rank=4, progress=False, seq_len=32)
    finetune(FinetuneConfig(out=str(tmp_path / "ft"), targets="wq,wv,w1,w2,w3", **common))
    out = run("export", str(tmp_path / "ft"), "--to", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "ft.gguf"))
    assert out.returncode == 0, out.stderr[-2000:]
    tuned, base = load(tmp_path / "ft.gguf").model, load(gguf).model
    assert tuned.config.n_experts == 8
    assert torch.equal(tuned.layers[0].feed_forward.gate.weight, base.layers[0].feed_forward.gate.weight)  # frozen
    changed = tuned.layers[0].feed_forward.experts.w1.dequantized() - base.layers[0].feed_forward.experts.w1.dequantized()
    assert changed.abs().amax(dim=(1, 2)).gt(0).any()  # the experts' LoRA, merged
    out = run("export", str(tmp_path / "ft"), "--to", "adapter", "--out", str(tmp_path / "adapter"))
    assert out.returncode != 0 and "export the fine-tune merged" in out.stderr


def test_llama4_chat_format_and_end_of_turn(models, tmp_path):
    """Llama 4's turns (<|header_start|>role<|header_end|>, ended by <|eot|>): the file's template renders as
    transformers' apply_chat_template does, and <|eot|> and <|eom|> end a reply."""
    import json

    from llamalite.text.chat_template import render_chat

    template = ("{{ bos_token }}{% for m in messages %}{{ '<|header_start|>' + m['role'] + '<|header_end|>\\n\\n' + "
                "m['content'] | trim + '<|eot|>' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|header_start|>assistant<|header_end|>\\n\\n' }}{% endif %}")
    _, path = models["llama4"]
    (tmp_path / "m").mkdir()
    for f in path.iterdir():
        (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
    tokenizer_json = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    for i, text in enumerate(("<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>")):
        tokenizer_json["added_tokens"].append({"id": 396 + i, "content": text, "single_word": False, "lstrip": False,
                                               "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    lm = load(tmp_path / "m")
    assert render_chat(lm.chat_template, lm.tokenizer, messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert {lm.tokenizer.token_id("<|eot|>"), lm.tokenizer.token_id("<|eom|>")} <= lm.tokenizer.end_ids


def test_gpt_oss_experts_in_mxfp4(models, tmp_path):
    """gpt-oss's experts in MXFP4 (the rest Q8_0, llama.cpp's MOSTLY_MXFP4_MOE): read as llama.cpp reads the
    same file (held as Q8_0 blocks until MXFP4 has a kernel: within that rounding)."""
    from llamalite.formats.export import export_gguf

    model, path = models["gpt-oss"]
    lm = load(path)
    gguf = export_gguf(lm.model, lm.tokenizer, tmp_path / "mx.gguf", dtype="mxfp4")
    ours = load(gguf)
    assert ours.tensor_types["MXFP4"] == 3 * 4 and ours.model.layers[0].feed_forward.experts.w1.type_name == "Q8_0"
    with torch.no_grad():
        got = ours.model(torch.tensor([IDS]))[0]
    want, _ = _reference(model)
    assert float((got - want).abs().max() / want.abs().max()) < 0.3  # 4-bit experts: near, not equal
    pytest.importorskip("llama_cpp", reason="the peer: pip install -e '.[peer]'")
    peer = llamacpp_logits(gguf, IDS)
    assert float((peer - got).abs().max() / peer.abs().max()) < 2e-2


def test_routing_ties_in_the_one_call_step(models, tmp_path):
    """A router that cannot tell its experts apart (all logits equal): the layers' step and the kernels' one-call
    step both take the lowest ids, so they still agree."""
    from llamalite.formats.export import export_gguf

    model, path = models["qwen3moe"]
    lm = load(path)
    m = load(export_gguf(lm.model, lm.tokenizer, tmp_path / "q8.gguf", dtype="q8_0")).model
    assert m.plan is not None
    with torch.no_grad():
        m.layers[0].feed_forward.gate.weight.zero_()  # the plan reads the same tensor
        m.setup_caches(1, 64, "f32")
        m(torch.tensor([IDS]), torch.arange(len(IDS)))
        one_call = m(torch.tensor([[7]]), torch.tensor([len(IDS)]))[0, -1]
        plan, m.plan = m.plan, None
        by_layers = m(torch.tensor([[7]]), torch.tensor([len(IDS)]))[0, -1]
        m.plan = plan
    assert float((one_call - by_layers).abs().max()) <= 1e-5 * float(by_layers.abs().max())


def test_the_executorch_program_refuses_what_it_cannot_run(models):
    pytest.importorskip("executorch")
    from llamalite.ondevice.export import DeviceExportError, export_executorch

    lm = load(models["gpt-oss"][1], quantized=False)
    with pytest.raises(DeviceExportError, match="cannot yet run a mixture of experts, attention sinks, sliding windows.*--to gguf"):
        export_executorch(lm.model, lm.tokenizer, "/nonexistent/x.pte")


def test_lora_on_the_experts(models):
    """Each expert its own LoRA pair: at first the base model exactly (B is zero), gradients only into the pairs
    (the router and the base frozen), and the merged experts compute what the adapted ones do."""
    from llamalite.train.lora import LoRAExperts, apply_lora, lora_layers, merge_lora

    lm = load(models["mixtral"][1], quantized=False)
    m = lm.model.train()
    ids = torch.tensor([IDS])
    with torch.no_grad():
        before = m(ids)
    apply_lora(m, rank=4, targets=("wq", "w1", "w2", "w3"))
    experts = [mod for _, t, mod in lora_layers(m) if isinstance(mod, LoRAExperts)]
    assert len(experts) == 3 * lm.config.n_layers and experts[0].lora_a.shape == (4, 4, 64)
    with torch.no_grad():
        assert torch.equal(m(ids), before)
        for e in experts:
            e.lora_b.normal_(0, 0.1)
    m(ids).sum().backward()
    assert all(e.lora_a.grad is not None and e.base.weight.grad is None for e in experts)
    assert m.layers[0].feed_forward.gate.weight.grad is None
    with torch.no_grad():
        adapted = m(ids)
        merge_lora(m)
        assert not lora_layers(m)
        assert float((m(ids) - adapted).abs().max()) < 1e-5
