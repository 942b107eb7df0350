"""Fixtures made in the test: tiny seeded models and tokenizers written in every format we load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. LLaMA is a family of language models. "
    "Numbers like 12, 345 and 6789 appear in text; so do emoji 😀 and Korean 안녕하세요. "
    "def main():\n\treturn 42\n"
) * 20


def train_bytelevel_bpe(vocab_size: int = 400):
    """A small byte-level BPE (GPT-2 style) trained on CORPUS with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return tok


def bpe_vocab_and_merges(tok) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE model with byte fallback, like LLaMA's tokenizer.model."""
    import sentencepiece as spm

    text = path.parent / "spm_corpus.txt"
    text.write_text(CORPUS)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   add_dummy_prefix=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    return path


def random_blocks(type_name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random block bytes with every fp16 scale field set to a finite, small value."""
    rng = np.random.default_rng(seed)
    from llamalite.kernels.blocks import BLOCK

    n_el, n_bytes = BLOCK[type_name]
    raw = rng.integers(0, 256, size=(n_blocks, n_bytes), dtype=np.uint8)
    halves = rng.uniform(-0.05, 0.05, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if type_name == "Q6_K":  # d sits at the end of the block
        raw[:, -2:] = halves[:, :2]
    elif type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):  # d and m / dmin lead the block
        raw[:, 0:4] = halves
    elif type_name == "MXFP4":  # an E8M0 exponent byte leads the block: scales of 2^-27 .. 2^12
        raw[:, 0] = rng.integers(100, 140, size=n_blocks, dtype=np.uint8)
    else:
        raw[:, 0:2] = halves[:, :2]
    return raw


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=400, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, rope_theta=10000.0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_hf_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**overrides)).float().eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_hf_dir(model, path: Path) -> Path:
    """model.safetensors + config.json + tokenizer.json (+ tokenizer_config.json) in `path`."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    train_bytelevel_bpe(model.config.vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    return path


def write_gguf(path: Path, weights: dict[str, np.ndarray], cfg, tensor_type: str = "F32",
               tokens: list[str] | None = None, merges: list[str] | None = None, pre: str = "gpt-2",
               chat_template: str | None = None) -> Path:
    """A llama GGUF from Meta-named fp32 weights; 2-D weights are stored as `tensor_type`."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from llamalite.formats.export import gguf_add_config
    from llamalite.formats.gguf import meta_to_gguf_name

    w = gguf.GGUFWriter(str(path), "llama")
    gguf_add_config(w, cfg)
    if tokens is None:
        tokens, merges = bpe_vocab_and_merges(train_bytelevel_bpe(cfg.vocab_size))
    tokens = tokens + [f"[PAD{i}]" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges(merges or [])
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    for name, t in weights.items():
        gname = meta_to_gguf_name(name)
        t = np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 1 or tensor_type == "F32":
            w.add_tensor(gname, t)
        elif tensor_type in ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"):
            q = gguf.quants.quantize(t, T[tensor_type])
            w.add_tensor(gname, q, raw_dtype=T[tensor_type])
        else:  # K-quants: the gguf package only decodes them, so store random blocks of the right size
            n_el, n_bytes = gguf.GGML_QUANT_SIZES[T[tensor_type]]
            blocks = random_blocks(tensor_type, t.size // n_el, seed=int(rng.integers(1 << 30)))
            w.add_tensor(gname, blocks.reshape(t.shape[0], -1), raw_dtype=T[tensor_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def meta_weights_from_hf(model) -> dict[str, torch.Tensor]:
    """An HF model's weights under Meta's names and RoPE layout (what GGUF and consolidated.pth hold)."""
    from llamalite.formats.layout import unpermute_rope
    from llamalite.formats.hf import hf_to_meta_name

    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        meta = hf_to_meta_name(name)
        if meta is None:
            continue
        t = t.detach().clone()
        if meta.endswith("wq.weight"):
            t = unpermute_rope(t, cfg.num_attention_heads)
        elif meta.endswith("wk.weight"):
            t = unpermute_rope(t, cfg.num_key_value_heads)
        out[meta] = t
    if cfg.tie_word_embeddings:
        out.pop("output.weight", None)
    return out


def transformers_run(model, ids: list[int], new_tokens: int = 32) -> tuple[torch.Tensor, list[int]]:
    """A transformers model's logits for `ids` (len(ids), vocab) and its `new_tokens` greedy tokens after them."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                min_new_tokens=new_tokens, pad_token_id=0)[0, len(ids):].tolist()
    return logits, greedy


def llamalite_run(lm, ids: list[int], new_tokens: int = 32) -> tuple[torch.Tensor, list[int]]:
    """The same of a loaded model: its full forward's logits, and greedy tokens decoded from a KV cache."""
    from llamalite.generation.sampling import GREEDY
    from llamalite.generation.tokens import generate

    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))[0]
    lm.model.setup_caches(1, 128, "f32")
    lm.model.cache_tokens = []
    return logits, list(generate(lm.model, ids, max_new_tokens=new_tokens, sampling=GREEDY))


def llamacpp_logits(gguf_path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits (len(ids), vocab) for `ids` from a GGUF file (needs llama-cpp-python)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    return torch.tensor(np.asarray(llm.scores[:len(ids)]))


def check_llamacpp_reads_our_gguf(model, lm, tmp_path: Path, ids: list[int], tol: float = 1e-3) -> None:
    """Our f32 GGUF export of `lm` read by llama.cpp: its logits within `tol` of the transformers `model`'s."""
    from llamalite.formats.export import export_gguf

    gguf = export_gguf(lm.model, lm.tokenizer, tmp_path / "f32.gguf", dtype="f32")
    want, _ = transformers_run(model, ids, new_tokens=1)
    assert float((llamacpp_logits(gguf, ids) - want).abs().max()) < tol


def check_hf_export_reads_back(model, lm, tmp_path: Path, ids: list[int], class_name: str) -> None:
    """Our Hugging Face export of `lm` read back by transformers as `class_name`, with `model`'s logits."""
    import transformers

    from llamalite.formats.export import export_hf

    again = transformers.AutoModelForCausalLM.from_pretrained(export_hf(lm.model, lm.tokenizer, tmp_path / "hf"))
    assert type(again).__name__ == class_name
    with torch.no_grad():
        assert torch.allclose(again.float()(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits, atol=1e-5)


def check_batched_equals_alone(model, prompts: list[list[int]], new_tokens: int = 16) -> None:
    """Requests of different lengths decoded together in the server's engine give what generate gives each alone."""
    from llamalite.generation.sampling import GREEDY
    from llamalite.generation.tokens import generate
    from llamalite.serve.engine import Engine, Request, TokenEvent

    want = []
    for p in prompts:
        model.cache_tokens = []
        want.append(list(generate(model, p, max_new_tokens=new_tokens, sampling=GREEDY)))
    engine = Engine(model, max_batch=len(prompts), max_seq_len=128).start()
    try:
        requests = [engine.submit(Request(p, max_tokens=new_tokens, sampling=GREEDY)) for p in prompts]
        assert [[e.token for e in r if isinstance(e, TokenEvent)] for r in requests] == want
    finally:
        engine.stop()
