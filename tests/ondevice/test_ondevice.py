"""ExecuTorch export (`export --to executorch`, llamalite.ondevice.export): the .pte program, run here through
executorch.runtime, gives the fp32 model's logits over a prompt taken in chunks and token by token (its
KV cache is the program's state) and its greedy tokens; 8da4w programs are smaller and stay near; the
verbs read a .pte; what cannot be exported is refused with the reason."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalite.model.config import ModelConfig
from llamalite.backends import load
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

pytest.importorskip("executorch", reason="the device extra: pip install -e '.[device]' (make test installs it)")

IDS = [5, 17, 99, 3, 250, 77, 12, 8, 300, 41, 9, 120]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama (sizes that divide by 32, for the grouped weights), fp32 GGUF, and its fp32 .pte."""
    from llamalite.ondevice.export import export_executorch

    d = tmp_path_factory.mktemp("ondevice")
    gguf = write_gguf(d / "tiny.gguf", *_tiny_weights(), tensor_type="F32")
    lm = load(gguf)
    return gguf, export_executorch(lm.model, lm.tokenizer, d / "tiny.pte", "fp32", max_seq_len=64)


def _tiny_weights():
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=256, context_length=128)
    return {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model(hidden_size=128, intermediate_size=256)).items()}, cfg


def test_the_fp32_program_is_the_model(tiny):
    from llamalite.generation.tokens import generate
    from llamalite.generation.sampling import GREEDY

    gguf, pte = tiny
    ref, program = load(gguf), load(pte)
    assert program.format == "executorch" and program.config.context_length == 64
    with torch.no_grad():
        want = ref.model(torch.tensor([IDS]))[0]
    chunks = [program.model(torch.tensor([IDS[a:b]]), torch.arange(a, b))[0] for a, b in ((0, 5), (5, 6), (6, 12))]
    assert float((torch.cat(chunks) - want).abs().max()) < 1e-4
    ref.model.setup_caches(1, 64, "f32")
    ref.model.cache_tokens = []
    assert list(generate(program.model, IDS, max_new_tokens=32, sampling=GREEDY)) == \
        list(generate(ref.model, IDS, max_new_tokens=32, sampling=GREEDY))
    assert program.tokenizer.encode("hello there") == ref.tokenizer.encode("hello there")


@pytest.mark.parametrize("dtype, source, bound", [("8da4w", "Q4_1", 0.03), ("8da8w", "F32", 0.04)])
def test_a_quantized_program_is_smaller_and_near(tiny, tmp_path, dtype, source, bound):
    """8-bit dynamic activations with 4-bit grouped or 8-bit per-channel weights: within their rounding, and
    from a Q4_1 file within the activations' rounding alone (its weights come back exactly)."""
    from llamalite.ondevice.export import export_executorch

    gguf, pte = tiny
    if source != "F32":
        gguf = write_gguf(tmp_path / "q.gguf", *_tiny_weights(), tensor_type=source)
    ref = load(gguf, quantized=False)
    small = export_executorch(ref.model, ref.tokenizer, tmp_path / "q.pte", dtype, max_seq_len=64)
    assert small.stat().st_size < pte.stat().st_size * 0.6
    with torch.no_grad():
        want = ref.model(torch.tensor([IDS]))[0]
    got = load(small).model(torch.tensor([IDS]), torch.arange(len(IDS)))[0]
    assert float((got - want).abs().max() / want.abs().max()) < bound


def test_8da4w_takes_q4_1_weights_and_a_q8_0_table_back_exactly():
    """Q4_1's blocks (a float minimum each) as XNNPACK's symmetric int4 groups plus the groups' offsets, and
    Q8_0's as embedding_byte's int8 groups: the same numbers, not a second rounding."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from llamalite.ondevice.export import GROUP, Int4Groups, Int8Embedding
    from llamalite.kernels.blocks import dequantize

    w = torch.randn(48, 96) + torch.rand(48, 1)  # groups that are not centred
    q4_1 = dequantize(gguf.quants.quantize(w.numpy(), Q.Q4_1), "Q4_1", (48, 96))
    layer = Int4Groups(_linear(q4_1))
    qw = layer.linear.weight
    assert int(qw.qdata.min()) >= -8 and int(qw.qdata.max()) <= 7
    back = (qw.qdata.float() * qw.scale.repeat_interleave(GROUP, 1)
            + (layer.offsets.weight / GROUP).repeat_interleave(GROUP, 1))
    assert float((back - q4_1).abs().max()) < 1e-6 * float(q4_1.abs().max())
    x = torch.randn(3, 96)
    assert torch.allclose(layer.offsets(torch.nn.functional.linear(x, layer.means)),
                          x @ (layer.offsets.weight / GROUP).repeat_interleave(GROUP, 1).T, atol=1e-5)
    q8_0 = dequantize(gguf.quants.quantize(w.numpy(), Q.Q8_0), "Q8_0", (48, 96))
    table = Int8Embedding(q8_0)
    assert table.weight.dtype == torch.int8 and table.scales.shape == (48, 96 // GROUP)
    rows = table(torch.tensor([[0, 7, 47]]))[0]
    assert float((rows - q8_0[[0, 7, 47]]).abs().max()) < 1e-6 * float(q8_0.abs().max())


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def test_the_verbs_read_a_program(tiny, tmp_path):
    gguf, pte = tiny
    run = lambda *a: subprocess.run([sys.executable, "-m", "llamalite", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=600)
    plain = run("generate", "--model", str(gguf), "-t", "0", "-n", "10", "hello there")
    from_pte = run("generate", "--model", str(pte), "-t", "0", "-n", "10", "hello there")
    assert from_pte.returncode == 0 and from_pte.stdout == plain.stdout, from_pte.stderr[-2000:]
    bench = run("bench", "--model", str(pte), "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8")
    assert bench.returncode == 0 and "decode_tok_s" in bench.stdout, bench.stderr[-2000:]
    text = tmp_path / "t.txt"
    text.write_text("hello there, general kenobi. " * 10)
    ppl = [run("eval", "perplexity", str(text), "--model", str(m), "--ctx", "32", "--json") for m in (gguf, pte)]
    import json

    a, b = (json.loads(p.stdout.strip().splitlines()[-1])["perplexity"] for p in ppl)
    assert a == pytest.approx(b, rel=1e-3)
    out = run("export", str(gguf), "--to", "executorch", "--out", str(tmp_path / "c.pte"), "--max-seq-len", "32")
    assert out.returncode == 0 and (tmp_path / "c.json").exists() and (tmp_path / "c.tokenizer").is_dir()
    for args, said in ((["--dtype", "q4_0"], "--to executorch takes --dtype fp32, 8da4w, 8da8w"),
                       (["--max-memory", "1K"], "more than --max-memory"),
                       (["--to", "gguf", "--max-seq-len", "8"], "are for --to executorch")):
        bad = run("export", str(gguf), "--to", "executorch", "--out", str(tmp_path / "x.pte"), *args)
        assert bad.returncode != 0 and said in bad.stderr, bad.stderr[-1000:]
    serve = run("serve", "--model", str(pte), "--port", "1")
    assert serve.returncode != 0 and "--max-batch 1" in serve.stderr
    for flags in (["--context-shift"], ["--prompt-cache", str(tmp_path / "pc")], ["--lookup", "3"]):
        refused = run("generate", "--model", str(pte), "-n", "4", *flags, "hi")
        assert refused.returncode == 1 and f"{flags[0]} cannot run on an ExecuTorch program" in refused.stderr, \
            refused.stderr[-1000:]
    refused = run("generate", "--model", str(gguf), "-n", "4", "--draft-model", str(pte), "hi")
    assert refused.returncode == 1 and "not an ExecuTorch program" in refused.stderr, refused.stderr[-1000:]


def test_biases_and_head_norms_export(tmp_path):
    """Qwen2's q/k/v biases and Qwen3's per-head norms (one layer with both): the 8da4w program of a random
    fp32 model stays within 4-bit rounding of it (0.034 here; leaving the norms out gives 0.11)."""
    from llamalite.model.transformer import Transformer
    from llamalite.ondevice.export import export_executorch
    from llamalite.ondevice.program import PteModel

    torch.manual_seed(0)
    cfg = ModelConfig(family="qwen3", dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=400,
                      hidden_dim=256, context_length=64, qkv_bias=True, qk_norm=True)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
        want = model(torch.tensor([IDS]))[0]
    pte = export_executorch(model, None, tmp_path / "f.pte", "8da4w", max_seq_len=32)
    got = PteModel(pte, cfg, 32)(torch.tensor([IDS]), torch.arange(len(IDS)))[0]
    assert float((got - want).abs().max() / want.abs().max()) < 0.06


def test_executorchs_own_runner_runs_the_program(tmp_path):
    """ExecuTorch's C++ LLM runner (TextLLMRunner: llama_main's and the phone apps') reads the program, its
    constant methods and the tokenizer.json beside it, and generates llamalite's greedy tokens. (A
    vocabulary of ASCII tokens only: the runner hands each token's text to Python as UTF-8.)"""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from llamalite.generation.tokens import generate
    from llamalite.ondevice.export import export_executorch
    from llamalite.generation.sampling import GREEDY

    tokens = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "<s>", "</s>"]
    gguf = write_gguf(tmp_path / "ascii.gguf", *_tiny_weights(), tensor_type="F32", tokens=tokens, merges=[])
    lm = load(gguf)
    with pytest.warns(UserWarning, match="pytorch-tokenizers"):  # text outside the vocabulary: told, not hidden
        pte = export_executorch(lm.model, lm.tokenizer, tmp_path / "ascii.pte", "fp32", max_seq_len=64)
    runner = TextLLMRunner(str(pte), str(pte.with_suffix(".tokenizer") / "tokenizer.json"))
    pieces: list[str] = []
    runner.generate("hello there", GenerationConfig(echo=False, max_new_tokens=12, temperature=0.0),
                    token_callback=pieces.append)
    program = load(pte)
    want = list(generate(program.model, program.tokenizer.encode("hello there"), max_new_tokens=12, sampling=GREEDY,
                         stop_ids=sorted(program.tokenizer.end_ids)))
    assert len(pieces) >= len(want) > 0
    assert pieces[:len(want)] == [program.tokenizer.decode([t]) for t in want]


def test_the_tokenizer_files_read_alike_on_a_device(tmp_path):
    """What ExecuTorch's tokenizer library (pytorch-tokenizers) makes of the written tokenizer is the model's
    tokenization: the default model's (SmolLM's digits each alone: HF's Digits, not a Split it reads
    otherwise), a GPT-2 one and LLaMA's SentencePiece (its BOS added apart). Falcon's sequence of splits it
    reads otherwise, and the export says so."""
    import lzma

    from llamalite.formats.load import load_tokenizer
    from llamalite.ondevice.export import _device_tokenizer_differs, _write_tokenizer
    from llamalite.formats.store import default_model_path

    vocab = Path(__file__).parent.parent / "fixtures" / "vocab"
    for name in ("llama-spm", "falcon"):
        (tmp_path / f"{name}.gguf").write_bytes(lzma.decompress((vocab / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
    sources = {"default": default_model_path(), "gpt2": write_gguf(tmp_path / "g.gguf", *_tiny_weights()),
               "llama-spm": tmp_path / "llama-spm.gguf", "falcon": tmp_path / "falcon.gguf"}
    for name, source in sources.items():
        tokenizer = load_tokenizer(str(source))
        _write_tokenizer(tokenizer, tmp_path / name)
        differs = _device_tokenizer_differs(tokenizer, tmp_path / name)
        assert (differs is not None) == (name == "falcon"), (name, differs)
