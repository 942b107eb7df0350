"""The CUDA path: opt-in, skipped where no GPU is present (CI has none)."""

import pytest
import torch

from llamalite.generation import generate
from llamalite.loading import load
from llamalite.sampling import GREEDY, SamplingParams
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
    from llamalite.config import ModelConfig
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
