"""Export: training checkpoints and loaded models out as GGUF (f32/f16/q8_0/q4_0) and Hugging Face
files, loaded back by llamalite, transformers and (where installed) llama.cpp."""

import subprocess
import sys

import pytest
import torch

from llamalite.train.data import prepare
from llamalite.formats.export import ExportError, export_gguf, export_hf
from llamalite.train.restore import load_for_export
from llamalite.generation.tokens import generate
from llamalite.formats.load import load
from llamalite.generation.sampling import GREEDY
from llamalite.train.loop import TrainConfig, train

TEXT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
        "and nothing particular to interest me on shore, I thought I would sail about a little.\n\n") * 30
IDS = torch.tensor([[0, 17, 250, 3, 99, 42, 7, 7, 128, 5, 64, 200]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "moby.txt").write_text(TEXT)
    prepare([root / "moby.txt"], None, root / "data", train_tokenizer_vocab=300, progress=False)
    train(TrainConfig(data=str(root / "data"), out=str(root / "run"), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=96, seq_len=32, batch_size=4, steps=6, eval_every=3, save_every=3, warmup=2,
                      lr=3e-3, eval_batches=1, progress=False))
    return root


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).float()


def test_checkpoint_to_f32_gguf_round_trips(run, tmp_path):
    model, tokenizer, _ = load_for_export(run / "run")
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    lm = load(path)
    torch.testing.assert_close(_logits(lm.model), _logits(model), atol=1e-5, rtol=0)
    text = "Some years ago, never mind how long"
    assert lm.tokenizer.encode(text) == tokenizer.encode(text)
    prompt = tokenizer.encode("Call me")
    ours = list(generate(model, prompt, max_new_tokens=12, sampling=GREEDY))
    assert list(generate(lm.model, prompt, max_new_tokens=12, sampling=GREEDY)) == ours


@pytest.mark.parametrize("dtype,tol", [("f16", 1e-2), ("q8_0", 3e-2), ("q4_0", 0.25)])
def test_lower_precision_gguf_exports_load_and_stay_close(run, tmp_path, dtype, tol):
    model, tokenizer, _ = load_for_export(run / "run" / "best.pt")
    lm = load(export_gguf(model, tokenizer, tmp_path / f"m-{dtype}.gguf", dtype))
    if dtype != "f16":
        assert dtype.upper() in lm.tensor_types
    want = _logits(model)
    assert (_logits(lm.model) - want).abs().max() <= tol * want.abs().max()


def test_hf_export_matches_transformers(run, tmp_path):
    from transformers import LlamaForCausalLM

    model, tokenizer, _ = load_for_export(run / "run")
    out = export_hf(model, tokenizer, tmp_path / "hf")
    ref = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, _logits(model), atol=1e-4, rtol=0)
    back = load(out)
    torch.testing.assert_close(_logits(back.model), _logits(model), atol=1e-5, rtol=0)
    assert back.tokenizer.encode("Call me Ishmael.") == tokenizer.encode("Call me Ishmael.")


def test_default_model_exports_keep_tokenizer_and_chat_template(default_model_file, default_lm_exact, tmp_path):
    model, tokenizer, _ = load_for_export(default_model_file)
    path = export_gguf(model, tokenizer, tmp_path / "smol-f32.gguf", "f32")
    lm = load(path)
    assert lm.chat_template == default_lm_exact.chat_template and lm.chat_template
    text = "Hello, world! 123 <|im_start|>user"
    assert lm.tokenizer.encode(text) == default_lm_exact.tokenizer.encode(text)
    assert lm.tokenizer.end_ids == default_lm_exact.tokenizer.end_ids
    torch.testing.assert_close(_logits(lm.model, IDS[:, 1:]), _logits(default_lm_exact.model, IDS[:, 1:]),
                               atol=1e-4, rtol=0)


def test_export_cli_and_errors(run, tmp_path):
    out = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, "-m", "llamalite", "export", str(run / "run"), "--to", "gguf", "--dtype",
                        "q8_0", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "llamalite", "generate", "--model", str(out), "--temperature", "0",
                        "--max-new-tokens", "5", "Call me"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, tokenizer, _ = load_for_export(run / "run")
    with pytest.raises(ExportError, match="unknown dtype"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", "q2_k")
    with pytest.raises(ExportError, match="quantized types go to GGUF"):
        export_hf(model, tokenizer, tmp_path / "x", "q8_0")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="cannot be read"):
        load_for_export(tmp_path / "junk.pt")


@pytest.mark.peer
def test_llama_cpp_loads_the_f32_export_and_agrees(run, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp peer is not installed (make peer)")
    model, tokenizer, _ = load_for_export(run / "run")
    path = export_gguf(model, tokenizer, tmp_path / "peer.gguf", "f32")
    prompt = tokenizer.encode("Call me")
    ours = list(generate(model, prompt, max_new_tokens=12, sampling=GREEDY))
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        if token == llm.token_eos() or len(theirs) == 12:
            break
        theirs.append(token)
    assert theirs == ours
