"""The CUDA path: opt-in, skipped where no GPU is present (CI has none)."""

import pytest
import torch

from llamalite.generation.tokens import generate
from llamalite.backends import load
from llamalite.generation.sampling import GREEDY, SamplingParams
from tests.helpers import save_hf_dir, tiny_hf_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def test_cuda_logits_and_greedy_tokens_match_cpu(tmp_path):
    path = save_hf_dir(tiny_hf_model(), tmp_path / "hf")
    cpu, gpu = load(path), load(path, device="cuda")
    assert gpu.model.tok_embeddings.weight.is_cuda and gpu.model.inv_freq.is_cuda
    tokens = torch.tensor([[1, 17, 250, 3, 99, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(gpu.model(tokens.cuda()).cpu(), cpu.model(tokens), atol=1e-4, rtol=0)
    prompt = [5, 17, 250, 3]
    assert list(generate(gpu.model, prompt, max_new_tokens=24, sampling=GREEDY)) == list(
        generate(cpu.model, prompt, max_new_tokens=24, sampling=GREEDY))
    sampled = list(generate(gpu.model, prompt, max_new_tokens=8, sampling=SamplingParams(),
                            generator=torch.Generator().manual_seed(0)))
    assert len(sampled) == 8


def test_cuda_gguf_q4_model_matches_cpu(tmp_path):
    from llamalite.model.config import ModelConfig
    from tests.helpers import meta_weights_from_hf, write_gguf

    ref = tiny_hf_model(hidden_size=256, intermediate_size=512, max_position_embeddings=64)
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=512,
                      context_length=64)
    path = write_gguf(tmp_path / "q4.gguf", {k: v.numpy() for k, v in meta_weights_from_hf(ref).items()}, cfg,
                      tensor_type="Q4_1")
    cpu, gpu = load(path, quantized=False), load(path, device="cuda")
    tokens = torch.tensor([[1, 17, 250, 3, 99]])
    with torch.no_grad():
        torch.testing.assert_close(gpu.model(tokens.cuda()).cpu(), cpu.model(tokens), atol=1e-4, rtol=0)


def test_cuda_engine_batches_like_solo_and_like_the_cpu(tmp_path):
    from llamalite.serve.engine import Engine, Request, TokenEvent

    path = save_hf_dir(tiny_hf_model(), tmp_path / "hf")
    cpu, gpu = load(path), load(path, device="cuda")
    engine = Engine(gpu.model, max_batch=3, max_seq_len=64).start()
    try:
        prompts = [[1, 5, 9, 200], [1, 17, 250, 3, 99, 42, 7], [1, 300], [1, 8, 8, 8, 8, 8, 8, 8, 8, 8]]

        def run(batch):
            requests = [engine.submit(Request(p, max_tokens=12)) for p in batch]
            return [[e.token for e in r if isinstance(e, TokenEvent)] for r in requests]

        solo = [run([p])[0] for p in prompts]
        assert run(prompts) == solo  # 4 requests over 3 slots
        assert engine.stats["largest_batch"] >= 2
    finally:
        engine.stop()
    for p, tokens in zip(prompts, solo):
        assert tokens == list(generate(cpu.model, p, max_new_tokens=12, sampling=GREEDY))


def _corpus(tmp_path):
    from llamalite.train.data import prepare

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 4 + "\n\n") * 60)
    prepare([root], None, root / "prep", train_tokenizer_vocab=300, val_every=5, progress=False)
    return root / "prep"


TINY_RUN = dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, seq_len=32, batch_size=8, warmup=5, lr=3e-3,
                eval_batches=2, progress=False, device="cuda")


def test_cuda_training_learns_and_resumes(tmp_path):
    import json

    from llamalite.train.loop import TrainConfig, train

    prep = _corpus(tmp_path)
    result = train(TrainConfig(data=str(prep), out=str(tmp_path / "run"), steps=40, eval_every=20, save_every=20,
                               **TINY_RUN))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and losses[-1] < losses[0] - 1.0, losses
    assert result["val_loss"] is not None
    # drop the last checkpoint and resume from step 20: it picks up and reaches step 40 again
    (tmp_path / "run" / "ckpt-0000040.pt").unlink()
    again = train(TrainConfig(data=str(prep), out=str(tmp_path / "run"), steps=40, eval_every=20, save_every=20,
                              resume=True, **TINY_RUN))
    assert again["steps"] == 40 and again["loss"] == pytest.approx(result["loss"], abs=0.05)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_cuda_torchrun_one_gpu(tmp_path, parallel):
    import subprocess
    import sys

    prep = _corpus(tmp_path)
    flags = ["--data", str(prep), "--out", str(tmp_path / parallel), "--steps", "10", "--eval-every", "10",
             "--save-every", "10", "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--hidden-dim", "128",
             "--seq-len", "32", "--batch-size", "8", "--warmup", "2", "--eval-batches", "2", "--no-progress",
             "--device", "cuda", "--parallel", parallel]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          "-m", "llamalite", "train", *flags], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / parallel / "ckpt-0000010.pt").exists()
