"""Embeddings: pooled last hidden states against transformers' on the same weights, batching that changes
nothing, paraphrases closer than unrelated texts on the default model, and /v1/embeddings through the
official `openai` client."""

import base64
import json

import httpx
import numpy as np
import pytest
import torch

from llamalite.generation.embed import embed, embed_ids
from llamalite.formats.load import load
from tests.helpers import save_hf_dir, tiny_hf_model

openai = pytest.importorskip("openai", reason="the test extras install openai")

INPUTS = [[5, 17, 99, 3], [250, 2, 8, 8, 8, 40, 11, 7, 19], [33], [90, 91, 92, 93, 94, 95]]


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_pooling_matches_transformers_hidden_states(pooling, tmp_path):
    ref = tiny_hf_model()
    ours = load(save_hf_dir(ref, tmp_path))
    got = embed_ids(ours.model, INPUTS, pooling)
    for i, ids in enumerate(INPUTS):
        with torch.no_grad():
            states = ref.model(torch.tensor([ids])).last_hidden_state[0]  # after the final norm, as ours
        want = {"mean": states.mean(0), "last": states[-1], "cls": states[0]}[pooling]
        want = want / want.norm()
        assert torch.dot(got[i], want) > 1 - 1e-4
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(INPUTS)))
    alone = torch.stack([embed_ids(ours.model, [ids], pooling)[0] for ids in INPUTS])
    assert torch.equal(alone, got)  # a text's vector is the same bits whatever else is asked with it


def test_errors_name_the_fix(tmp_path):
    ours = load(save_hf_dir(tiny_hf_model(), tmp_path))
    with pytest.raises(ValueError, match="known: mean, last, cls"):
        embed_ids(ours.model, INPUTS, "max")
    with pytest.raises(ValueError, match="context"):
        embed_ids(ours.model, [list(range(300))])
    with pytest.raises(ValueError, match="empty"):
        embed_ids(ours.model, [[]])


PARAPHRASES = [
    ("The cat sat on the mat.", "A cat was sitting on the rug."),
    ("How do I bake bread at home?", "What is a good way to make bread in my kitchen?"),
    ("The stock market fell sharply today.", "Share prices dropped a lot on the exchange today."),
    ("She plays the violin beautifully.", "Her violin playing is lovely."),
    ("It is raining heavily in London.", "There is a lot of rain falling in London."),
    ("Python is a popular programming language.", "Many developers write code in Python."),
]


def test_paraphrases_score_closer_than_unrelated_texts(default_lm, default_lm_exact):
    texts = [t for pair in PARAPHRASES for t in pair]
    vectors = embed(default_lm, texts)
    sims = vectors @ vectors.T
    wins = 0
    for k in range(len(PARAPHRASES)):
        a, b = 2 * k, 2 * k + 1
        unrelated = [sims[a, j] for j in range(len(texts)) if j not in (a, b)]
        wins += bool(sims[a, b] > max(unrelated))
    assert wins >= 5, sims  # each text's nearest neighbour is its paraphrase, but for at most one
    exact = embed(default_lm_exact, texts)  # the kernels' quantized path against fp32 weights
    assert (vectors * exact).sum(-1).min() > 0.999


def test_embeddings_endpoint(client, served):
    url, server = served
    texts = ["The cat sat on the mat.", "A cat was sitting on the rug.", "Share prices dropped today."]
    r = client.embeddings.create(model="smollm2", input=texts)
    got = torch.tensor([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
    assert got.shape == (3, server.lm.config.dim) and r.usage.prompt_tokens > 3
    assert torch.allclose(got, embed(server.lm, texts), atol=1e-5)
    raw = httpx.post(url + "/v1/embeddings", json={"model": "smollm2", "input": texts[0],
                                                     "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    single = client.embeddings.create(model="smollm2", input=texts[0]).data[0].embedding
    assert np.array_equal(decoded, np.array(single, dtype=np.float32))
    # each text runs alone (embed.py): the same vector, bit for bit, asked alone or with others
    assert np.array_equal(decoded, got[0].numpy())
    ids = server.tokenizer.encode(texts[1])
    by_ids = client.embeddings.create(model="smollm2", input=[ids])
    assert np.array_equal(np.array(by_ids.data[0].embedding, dtype=np.float32), got[1].numpy())
    assert client.embeddings.create(model="smollm2", input=texts[:1], dimensions=server.lm.config.dim).data


@pytest.mark.parametrize("body,param,words", [
    ({"input": "hi", "dimensions": 64}, "dimensions", "cannot be shortened"),
    ({"input": []}, "input", "input"),
    ({"input": "x" * 200_000}, "input", "characters"),
    ({"input": [[1, 2], []]}, "input", "input"),
    ({"input": [10 ** 9]}, "input", "vocabulary"),
    ({"input": "hi", "pooling": "max"}, "pooling", "not supported"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
], ids=["dimensions", "empty list", "too long", "empty ids", "bad id", "unknown field", "bad format"])
def test_bad_embedding_requests(served, body, param, words):
    url, _ = served
    r = httpx.post(url + "/v1/embeddings", json={"model": "smollm2", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"] or "").startswith(param) and words in error["message"], error


def test_embed_command(capsys):
    from llamalite.cli.main import main

    assert main(["embed", "--pooling", "last", "hello there", "general kenobi"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["index"] for x in lines] == [0, 1] and len(lines[0]["embedding"]) == 576
    assert abs(sum(v * v for v in lines[1]["embedding"]) - 1) < 1e-4
