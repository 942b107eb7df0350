"""Evaluation: perplexity by llama.cpp's method, multiple choice by log-likelihood."""

import json
import math

import pytest
import torch

from llamalite.eval.scoring import EvalError, Item, encode_pair, loglikelihood, multiple_choice, perplexity, read_tasks

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 20


class Uniform(torch.nn.Module):
    """Logits all equal: every token has probability 1/V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(default_lm):
    r = perplexity(Uniform(default_lm.tokenizer.vocab_size), default_lm.tokenizer, TEXT, ctx=64, progress=False)
    assert r["perplexity"] == pytest.approx(default_lm.tokenizer.vocab_size, rel=1e-6)
    assert r["scored_tokens"] == r["windows"] * (64 - 32 - 1)


def test_perplexity_follows_llama_cpp_windows(default_lm):
    """Recomputed by hand for the real model: windows of ctx, BOS first, second half scored."""
    tok, model, ctx = default_lm.tokenizer, default_lm.model, 32
    r = perplexity(model, tok, TEXT, ctx=ctx, progress=False)
    ids = tok.encode(TEXT, parse_special=False)
    nll, count = 0.0, 0
    for i in range(len(ids) // ctx):
        w = ids[i * ctx:(i + 1) * ctx]
        if tok.add_bos:
            w = [tok.bos_id] + w[1:]
        with torch.no_grad():
            logp = model(torch.tensor([w]))[0].log_softmax(-1)
        for j in range(ctx // 2, ctx - 1):
            nll -= float(logp[j, ids[i * ctx + j + 1]])
            count += 1
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert 1 < r["perplexity"] < 20  # repetitive English: a real model finds it easy
    with pytest.raises(EvalError, match="needs at least"):
        perplexity(model, tok, "too short", ctx=512, progress=False)


def test_encode_pair_moves_context_spaces_to_the_continuation(default_lm):
    tok = default_lm.tokenizer
    ctx, cont = encode_pair(tok, "Question: 2+2?\nAnswer: ", "4")
    assert ctx + cont == tok.encode("Question: 2+2?\nAnswer: 4", parse_special=False)
    assert tok.decode(cont).startswith(" ")


def test_multiple_choice_scores_the_shipped_task(default_lm):
    from pathlib import Path

    import llamalite

    items = read_tasks(Path(llamalite.__file__).parent / "eval" / "tasks" / "basic_facts.jsonl")
    assert len(items) == 40
    r = multiple_choice(default_lm.model, default_lm.tokenizer, items[:10], progress=False)
    assert r["n"] == 10 and r["acc"] >= 0.6  # four choices: chance is 0.25
    # by hand for one question: the choice with the highest log-likelihood wins
    item = Item("Question: What is the capital of France?\nAnswer:", ["London", "Paris"], 1)
    scores = [loglikelihood(default_lm.model, *encode_pair(default_lm.tokenizer, item.context, " " + c))[0]
              for c in item.choices]
    assert scores[1] > scores[0]
    assert multiple_choice(default_lm.model, default_lm.tokenizer, [item], progress=False)["acc"] == 1.0


def test_bad_task_files(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"context": "x", "choices": ["a"], "gold": 0}) + "\n")
    with pytest.raises(EvalError, match="at least two choices"):
        read_tasks(tmp_path / "t.jsonl")
    (tmp_path / "u.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(EvalError, match=r"u.jsonl:1"):
        read_tasks(tmp_path / "u.jsonl")
    with pytest.raises(EvalError, match="no task file"):
        read_tasks(tmp_path / "missing.jsonl")


@pytest.mark.peer
def test_perplexity_agrees_with_llama_cpp(default_model_file, default_lm):
    """llama.cpp's logits through llama-cpp-python, scored the same way: within 1%."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama.cpp peer is not installed (make peer)")
    import numpy as np

    ctx = 128
    ours = perplexity(default_lm.model, default_lm.tokenizer, TEXT * 2, ctx=ctx, progress=False)
    llm = llama_cpp.Llama(str(default_model_file), n_ctx=ctx, logits_all=True, verbose=False, n_batch=ctx)
    ids = llm.tokenize((TEXT * 2).encode(), add_bos=default_lm.tokenizer.add_bos, special=False)
    assert ids == default_lm.tokenizer.encode(TEXT * 2, parse_special=False)
    nll, count = 0.0, 0
    for i in range(len(ids) // ctx):
        w = ids[i * ctx:(i + 1) * ctx]
        if default_lm.tokenizer.add_bos:
            w = [llm.token_bos()] + w[1:]
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        for j in range(ctx // 2, ctx - 1):
            nll -= logp[j, ids[i * ctx + j + 1]]
            count += 1
    theirs = math.exp(nll / count)
    assert ours["perplexity"] == pytest.approx(theirs, rel=0.01)
