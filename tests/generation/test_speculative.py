"""Speculative decoding (--draft-model, --lookup): greedy output is token for token the output without a
draft, on the default model and on tiny random models whose drafts are mostly wrong; sampled tokens
follow the model's own distribution (chi-square, for drafts kept and drafts replaced); the cache after
rejected drafts holds what the next turn reuses; the flags and their errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from llamalite.model.config import ModelConfig
from llamalite.generation.tokens import generate
from llamalite.generation.sampling import GREEDY, SamplingParams, distribution
from llamalite.generation.sampling import choose
from llamalite.generation.speculative import DraftError, DraftModel, PromptLookup, Speculation
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=256)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny random models of one vocabulary (write_gguf's tokenizer): a target and a draft that
    agrees with it now and then."""
    from llamalite.formats.load import load

    d = tmp_path_factory.mktemp("spec")
    paths = [write_gguf(d / f"m{seed}.gguf", {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model(seed)).items()},
                        CFG, tensor_type="Q8_0") for seed in (0, 1)]
    return load(paths[0]), load(paths[1])


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        motif = [int(x) for x in rng.integers(5, 390, 6)]
        out.append(motif * 3 + [int(x) for x in rng.integers(5, 390, int(rng.integers(3, 20)))])  # something to look up
    return out


def test_greedy_output_is_the_output_without_a_draft(pair):
    target, draft = pair
    for prompt in _prompts(12):
        want = list(generate(target.model, prompt, max_new_tokens=40, sampling=GREEDY))
        for spec in (Speculation(PromptLookup(2), draft_max=5), Speculation(PromptLookup(1), draft_max=7),
                     Speculation(DraftModel(draft.model), draft_max=4),
                     Speculation(DraftModel(draft.model, p_min=0.75), draft_max=2, draft_min=2)):
            target.model.cache_tokens = []
            got = list(generate(target.model, prompt, max_new_tokens=40, sampling=GREEDY, speculation=spec))
            assert got == want


def test_the_default_model_with_a_lookup_and_with_itself_as_draft(default_model_file):
    from llamalite.text.chat_template import encode_chat
    from llamalite.formats.load import load

    lm, twin = load(default_model_file), load(default_model_file)
    text = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to "
            "do: once or twice she had peeped into the book her sister was reading.")
    twin_kept = []
    for ask in ("Copy this text word for word:\n\n" + text, "What is the capital of France?"):
        ids = encode_chat(lm.chat_template, lm.tokenizer, [{"role": "user", "content": ask}])
        lm.model.cache_tokens = []
        want = list(generate(lm.model, ids, max_new_tokens=48, sampling=GREEDY, stop_ids=lm.tokenizer.end_ids))
        for spec in (Speculation(PromptLookup(3), draft_max=7), Speculation(DraftModel(twin.model), draft_max=4)):
            lm.model.cache_tokens = []
            got = list(generate(lm.model, ids, max_new_tokens=48, sampling=GREEDY, stop_ids=lm.tokenizer.end_ids,
                                speculation=spec))
            assert got == want, ask
        twin_kept.append(spec.stats.acceptance)
    assert twin_kept[0] > 0.8  # its own twin drafting a long reply: nearly every draft is kept


def test_a_grammar_rejects_drafts_that_break_it(pair):
    """Drafts that the grammar forbids are never taken: the output is the constrained output without drafts."""
    from llamalite.generation.constrain import Grammar

    target, draft = pair
    grammar = Grammar.gbnf(target.tokenizer, 'root ::= "ab" [a-z]* "."')
    prompt = _prompts(1)[0]
    want = list(generate(target.model, prompt, max_new_tokens=30, sampling=GREEDY, constraint=grammar.matcher()))
    for spec in (Speculation(PromptLookup(1), draft_max=6), Speculation(DraftModel(draft.model), draft_max=3)):
        target.model.cache_tokens = []
        got = list(generate(target.model, prompt, max_new_tokens=30, sampling=GREEDY, constraint=grammar.matcher(),
                            speculation=spec))
        assert got == want


def test_the_cache_after_rejected_drafts_serves_the_next_turn(pair):
    """A conversation's second turn reuses the first's cache (cache_tokens, the prefix kept): after a
    speculative first turn that reuse gives the same second turn as without speculation."""
    target, draft = pair
    first = _prompts(1, seed=3)[0]
    outs = []
    for spec in (None, Speculation(DraftModel(draft.model), draft_max=5)):
        target.model.cache_tokens = []
        reply = list(generate(target.model, first, max_new_tokens=25, sampling=GREEDY, speculation=spec))
        assert len(target.model.cache_tokens) == len(first) + len(reply) - 1  # the last reply token is not in it
        second = first + reply + [7, 8, 9]
        outs.append((reply, list(generate(target.model, second, max_new_tokens=25, sampling=GREEDY, speculation=spec))))
    assert outs[0] == outs[1]


def _chi_square(draws: list[int], p: torch.Tensor) -> float:
    """The p-value of the draws against the distribution p, over tokens with an expected count of 5 or more
    (the rest pooled)."""
    counts = np.bincount(draws, minlength=p.numel()).astype(float)
    expected = p.numpy() * len(draws)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # nothing much pooled: fold it into the largest
        obs, exp = obs[:-1], exp[:-1]
        obs[np.argmax(exp)] += counts[~big].sum()
        exp[np.argmax(exp)] += expected[~big].sum()
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
                                      SamplingParams(temperature=0.7, top_k=12, top_p=0.95, min_p=0.05)])
def test_sampled_tokens_follow_the_models_distribution(pair, sampling):
    """The rule on its own, many draws: draft tokens from the other model's distribution q (kept or
    replaced), and a fixed lookup token (kept with probability p(d)); each token drawn is distributed as p.
    (The other tiny model's own distribution shares little with this one's, so q mixes the two.)"""
    target, draft = pair
    ids = _prompts(1, seed=5)[0]
    with torch.inference_mode():
        p_logits = target.model(torch.tensor([ids]))[0, -1]
        q_logits = draft.model(torch.tensor([ids]))[0, -1]
    p = distribution(p_logits, sampling, ids)
    q = (p + distribution(q_logits, sampling, ids)) / 2  # a draft near the model, as a good one is
    g = torch.Generator().manual_seed(0)
    kept, draws = 0, []
    for _ in range(20000):
        d = int(torch.multinomial(q, 1, generator=g))
        t = choose(p_logits, sampling, ids, g, d, q)
        kept += t == d
        draws.append(t)
    assert 200 < kept < len(draws) - 200  # both paths taken, many times
    assert _chi_square(draws, p) > 1e-3
    lookup = int(torch.argsort(p, descending=True)[1])  # a token the model gives some, not most, of its mass
    draws = [choose(p_logits, sampling, ids, g, lookup, None) for _ in range(20000)]
    assert _chi_square(draws, p) > 1e-3


def test_sampled_generation_follows_the_models_distribution(pair):
    """End to end: the second generated token, over many seeds, with drafts from the other model, is
    distributed as the model's own next-token distribution after the first."""
    target, draft = pair
    sampling = SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0)
    prompt = _prompts(1, seed=7)[0]
    firsts, seconds = [], []
    spec = Speculation(DraftModel(draft.model), draft_max=3)
    for seed in range(6000):
        out = list(generate(target.model, prompt, max_new_tokens=3, sampling=sampling,
                            generator=torch.Generator().manual_seed(seed), speculation=spec))
        firsts.append(out[0])
        seconds.append(out[1])
    first = max(set(firsts), key=firsts.count)
    after = [s for f, s in zip(firsts, seconds) if f == first]
    assert len(after) > 600 and spec.stats.passes > 3000
    with torch.inference_mode():
        logits = target.model(torch.tensor([prompt + [first]]))[0, -1]
    assert _chi_square(after, distribution(logits, sampling, prompt + [first])) > 1e-3


def test_lookup_drafts_what_followed_the_last_ngram():
    lookup = PromptLookup(3, per=1)  # as many tokens as the places agree over (the default: half as many)
    seq = [1, 2, 3, 4, 5, 9, 9, 2, 3, 4]
    assert lookup.draft(seq, 3, GREEDY, None) == ([5, 9, 9], None)  # 2 3 4 was followed by 5 9 9
    assert lookup.draft(seq + [7], 3, GREEDY, None) == ([], None)  # nothing ends in 7 before
    assert lookup.draft(seq + [7, 1], 2, GREEDY, None) == ([2], None)  # only the 1-gram matches: one token
    assert lookup.draft([5, 6, 5], 4, GREEDY, None) == ([6], None)  # another sequence: indexed anew; agree over 1
    long = list(range(10, 30)) + [1] + list(range(10, 30))
    assert lookup.draft(long, 7, GREEDY, None)[0] == [1, 10, 11, 12, 13, 14, 15]  # agree over 20 tokens: all 7
    assert PromptLookup(3).draft([7, 8, 9, 4, 8, 9], 7, GREEDY, None) == ([4], None)  # over 2, half: 1


def test_the_flags_and_their_errors(pair, tmp_path):
    target, draft = pair
    with pytest.raises(DraftError, match="another vocabulary"):
        from llamalite.formats.load import load
        from llamalite.formats.store import default_model_path

        other = load(default_model_path())
        DraftModel.check_vocabulary(target.tokenizer, other.tokenizer, 400, other.config.vocab_size)
    with pytest.raises(ValueError, match="--draft-max must be between 1 and 7"):
        Speculation(PromptLookup(2), draft_max=9)
    m = str(target.path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "llamalite", *a], capture_output=True, text=True, timeout=300)
    out = run("bench", "--model", m, "--draft-model", str(draft.path), "--draft-p-min", "0", "--repeats", "1",
              "--prompt-tokens", "32",
              "--gen-tokens", "32", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout)["speculation"]
    assert stats["draft_passes"] > 0 and 0 <= stats["acceptance_rate"] <= 1 and stats["tokens_per_pass"] >= 1
    plain = run("generate", "--model", m, "-t", "0", "-n", "20", "hello hello hello")
    looked = run("generate", "--model", m, "-t", "0", "-n", "20", "--lookup", "2", "hello hello hello")
    assert looked.returncode == 0 and looked.stdout == plain.stdout
    for args, said in ((["--draft-max", "3"], "--draft-max needs --draft-model MODEL or --lookup N"),
                       (["--lookup", "2", "--draft-model", m], "not both"),
                       (["--lookup", "2", "--draft-p-min", "0.5"], "--draft-p-min is the draft model's")):
        bad = run("generate", "--model", m, "-n", "2", *args, "hi")
        assert bad.returncode != 0 and said in bad.stderr, bad.stderr
    for args, said in ((["--draft-max", "3"], "--draft-max needs --draft-model MODEL or --lookup N"),
                       (["--lookup", "2", "--draft-max", "9"], "--draft-max must be between 1 and 7")):
        bad = run("serve", "--model", m, *args)  # refused before any model loads
        assert bad.returncode != 0 and said in bad.stderr, bad.stderr


def test_the_engine_batches_rows_with_and_without_drafts(default_model_file):
    """Requests with drafts (a lookup, a draft model) and without (n_max 0) decode in the same steps, each
    giving what generate gives alone; the draft model keeps a cache row for each slot."""
    from llamalite.eval.bench import bench_prompt
    from llamalite.formats.load import load
    from llamalite.serve.engine import Engine, Request, TokenEvent
    from llamalite.generation.speculative import Drafting

    lm = load(default_model_file)
    prompts = [bench_prompt(lm.tokenizer, 90), lm.tokenizer.encode("The capital of France is"),
               lm.tokenizer.encode("1, 2, 3, 4, 5,"), bench_prompt(lm.tokenizer, 40)]
    want = []
    for p in prompts:
        lm.model.cache_tokens = []
        want.append(list(generate(lm.model, p, max_new_tokens=40, sampling=GREEDY, stop_ids=lm.tokenizer.end_ids)))
    for drafting in (Drafting(lookup=3, draft_max=7), Drafting(DraftModel(load(default_model_file).model), draft_max=3)):
        engine = Engine(lm.model, max_batch=4, max_seq_len=512, drafting=drafting).start()
        try:
            settings = [None, {"n_max": 0}, {"n_max": 2, "n_min": 2}, None]
            requests = [engine.submit(Request(p, max_tokens=40, sampling=GREEDY, stop_ids=lm.tokenizer.end_ids,
                                              speculative=s)) for p, s in zip(prompts, settings)]
            outs = [[e.token for e in r if isinstance(e, TokenEvent)] for r in requests]
        finally:
            engine.stop()
        assert outs == want
        assert requests[1].speculation is None and requests[0].speculation.stats.accepted > 0
        assert engine.stats["largest_batch"] == 4


def test_the_server_speculates_per_request(default_model_file):
    """`serve --lookup`: the same greedy replies as a server without drafts, through the `openai` client,
    with llama.cpp's speculative settings (nested or flat), JSON mode included; a server without drafting
    refuses the settings with a 400 naming them."""
    openai = pytest.importorskip("openai")
    from llamalite.formats.load import load
    from llamalite.serve import BackgroundServer, Server, create_app
    from llamalite.generation.speculative import Drafting

    text = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
            "to do.")
    asks = [("Copy this text word for word:\n\n" + text, {}), ("Copy this:\n\n" + text, {"speculative": {"n_max": 4}}),
            ("Copy this text:\n\n" + text, {"speculative.n_max": 2, "speculative.n_min": 1}),
            ("Give a JSON object with a key 'name' for: " + text, {"response_format": {"type": "json_object"}})]
    replies = {}
    for drafting in (None, Drafting(lookup=3, draft_max=7)):
        server = Server(load(default_model_file), "m", max_batch=4, max_seq_len=1024, drafting=drafting)
        with BackgroundServer(create_app(server)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            for ask, extra in asks:
                body = {k: v for k, v in extra.items() if k == "response_format"}
                if drafting is None and len(extra) > len(body):  # speculative settings: refused here
                    with pytest.raises(openai.BadRequestError, match="--draft-model or --lookup"):
                        client.chat.completions.create(model="m", messages=[{"role": "user", "content": ask}],
                                                       max_tokens=40, temperature=0, extra_body=extra)
                    extra = {}
                r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": ask}],
                                                   max_tokens=40, temperature=0, extra_body=extra)
                replies.setdefault(ask, []).append(r.choices[0].message.content)
            if drafting is not None:
                with pytest.raises(openai.BadRequestError, match="given twice"):
                    client.completions.create(model="m", prompt="hi", max_tokens=2, extra_body={
                        "speculative": {"n_max": 2}, "speculative.n_max": 3})
                with pytest.raises(openai.BadRequestError, match="draft model's setting"):
                    client.completions.create(model="m", prompt="hi", max_tokens=2,
                                              extra_body={"speculative": {"p_min": 0.5}})
                with pytest.raises(openai.BadRequestError, match="less than or equal to 7"):
                    client.completions.create(model="m", prompt="hi", max_tokens=2,
                                              extra_body={"speculative": {"n_max": 9}})
    for ask, (plain, drafted) in replies.items():
        assert plain == drafted, ask
    json.loads(replies[asks[3][0]][1])
