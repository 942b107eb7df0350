"""The real default model (SmolLM2-135M-Instruct Q4_1) against transformers' GGUF loading in fp32."""

import pytest
import torch

from llamalite.text.chat_template import render_chat
from llamalite.generation.tokens import generate
from llamalite.generation.sampling import GREEDY

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_reference(default_model_file):
    transformers = pytest.importorskip("transformers")
    folder, name = str(default_model_file.parent), default_model_file.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(default_lm_exact, hf_reference, prompt):
    model, _ = hf_reference
    ids = torch.tensor([default_lm_exact.tokenizer.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(default_lm_exact.model(ids), model(ids).logits, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_32_greedy_tokens_match_transformers(default_lm_exact, hf_reference):
    model, _ = hf_reference
    prompt = default_lm_exact.tokenizer.encode(PROMPTS[2])
    ours = list(generate(default_lm_exact.model, prompt, max_new_tokens=32, sampling=GREEDY))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    # We stop at an end-of-turn token; transformers was told not to.
    assert ours == theirs[:len(ours)] and len(ours) >= 8
    assert default_lm_exact.tokenizer.decode(ours).strip().startswith("12 times 7")


@pytest.mark.slow
def test_chat_template_matches_apply_chat_template(default_lm, hf_reference):
    _, hf_tok = hf_reference
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
    ]
    for messages in conversations:
        for gen in (True, False):
            expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_chat(default_lm.chat_template, default_lm.tokenizer, messages, gen) == expected


def test_answers_the_capital_question(default_lm):
    """Faithfulness on the prompt users try first."""
    tok = default_lm.tokenizer
    text = render_chat(default_lm.chat_template, tok, [{"role": "user", "content": "What is the capital of France?"}])
    ids = list(generate(default_lm.model, tok.encode(text, add_bos=False), max_new_tokens=20, sampling=GREEDY,
                        stop_ids=tok.end_ids))
    assert tok.decode(ids) == "The capital of France is Paris."


FAITHFULNESS_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
]


def test_quantized_fast_path_is_faithful_to_the_fp32_reference(default_lm, default_lm_exact):
    """The kernels quantize activations to int16: logits stay within a small bound of the dequantized
    fp32 reference and greedy answers stay the same."""
    tok = default_lm.tokenizer
    for question in FAITHFULNESS_PROMPTS:
        text = render_chat(default_lm.chat_template, tok, [{"role": "user", "content": question}])
        ids = tok.encode(text, add_bos=False)
        with torch.no_grad():
            for n in (1, 4, len(ids)):  # decode-sized (kernel) and prefill-sized (GEMM) batches
                x = torch.tensor([ids[:n]])
                fast, exact = default_lm.model(x), default_lm_exact.model(x)
                assert (fast - exact).abs().max() < 0.05 * exact.abs().max()
        fast_tokens = list(generate(default_lm.model, ids, max_new_tokens=24, sampling=GREEDY, stop_ids=tok.end_ids))
        exact_tokens = list(generate(default_lm_exact.model, ids, max_new_tokens=24, sampling=GREEDY,
                                     stop_ids=tok.end_ids))
        assert fast_tokens == exact_tokens, question
