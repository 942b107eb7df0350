"""Speculative decoding, measured: prompt lookup on a copy-heavy task against llama.cpp's own lookup
decoding, a draft model for a bigger model of the same vocabulary, and what a draft pass costs at the
7B shape, from which the acceptance rate that breaks even follows.

    python benchmarks/bench_speculative.py [--repeats 3] [--threads 2] [--pair FILE.gguf] [--big FILE.gguf]

1. Copy task (the default model asked to copy a 300-token text, greedy, up to 320 tokens): decode tok/s
   (first token to last) without a draft and with `--lookup N --draft-max K`, and llama.cpp (through
   llama-cpp-python, in a process that imports only it) without and with `LlamaPromptLookupDecoding`;
   both from the same token ids, alternating. Each of our speculative runs must reproduce the plain one.
2. A draft pair (--pair: a bigger export of the default model, e.g. `llamalite export <default model>
   --to gguf --dtype q8_0`): the default model drafting for it.
3. The 7B shape (--big: benchmarks/make_7b_gguf.py's file, which has the default model's vocabulary): the
   time of one pass over 1..8 rows against one row, and of a draft step of the default model; with these,
   the expected speed-up for an acceptance rate a and K drafted, (1 - a^(K+1)) / (1 - a) tokens a pass
   over (pass(K+1) + K draft steps), and the rate that breaks even.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, 'and what is the use of a book,' thought Alice 'without pictures or conversations?' So she was "
    "considering in her own mind (as well as she could, for the hot day made her feel very sleepy and stupid), "
    "whether the pleasure of making a daisy-chain would be worth the trouble of getting up and picking the "
    "daisies, when suddenly a White Rabbit with pink eyes ran close by her. There was nothing so very remarkable "
    "in that; nor did Alice think it so very much out of the way to hear the Rabbit say to itself, 'Oh dear! Oh "
    "dear! I shall be late!' (when she thought it over afterwards, it occurred to her that she ought to have "
    "wondered at this, but at the time it all seemed quite natural); but when the Rabbit actually took a watch "
    "out of its waistcoat-pocket, and looked at it, and then hurried on, Alice started to her feet."
)
GEN = 320


def peer_worker(model: str, ids_file: str, gen: int, threads: int, lookup: int, k: int) -> dict:
    """llama.cpp's greedy decode of the ids, with its prompt lookup decoding when `lookup`."""
    from llama_cpp import Llama

    ids = json.loads(open(ids_file).read())
    draft = None
    if lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(max_ngram_size=lookup, num_pred_tokens=k)
    llm = Llama(model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, draft_model=draft, verbose=False)
    t0 = time.perf_counter()
    out, first = [], None
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        first = first or time.perf_counter()
        if token == llm.token_eos() or len(out) == gen:
            break
        out.append(token)
    end = time.perf_counter()
    return {"tokens": len(out), "ttft_s": first - t0, "decode_tok_s": (len(out) - 1) / (end - first), "ids": out}


def ours(lm, ids, gen, speculation=None) -> dict:
    from llamalite.generation.tokens import generate
    from llamalite.generation.sampling import GREEDY

    lm.model.cache_tokens = []
    t0 = time.perf_counter()
    out, first = [], None
    for token in generate(lm.model, ids, max_new_tokens=gen, sampling=GREEDY, stop_ids=lm.tokenizer.end_ids,
                          speculation=speculation):
        first = first or time.perf_counter()
        out.append(token)
    end = time.perf_counter()
    r = {"tokens": len(out), "ttft_s": first - t0, "decode_tok_s": (len(out) - 1) / (end - first), "ids": out}
    if speculation is not None:
        r.update(speculation.stats.as_dict())
    return r


def peer(model, ids, gen, threads, lookup=0, k=10) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    out = subprocess.run([sys.executable, __file__, "--worker", model, f.name, str(gen), str(threads), str(lookup),
                          str(k)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def copy_task(args) -> None:
    import torch

    from llamalite.eval.bench import bench_prompt
    from llamalite.text.chat_template import encode_chat
    from llamalite.formats.load import load
    from llamalite.generation.speculative import PromptLookup, Speculation
    from llamalite.formats.store import default_model_path

    torch.set_num_threads(args.threads)
    model = str(default_model_path())
    lm = load(model)
    tasks = {"copy (asked to copy a 300-token text; it copies most, rewording some)": encode_chat(
        lm.chat_template, lm.tokenizer, [{"role": "user", "content": "Copy this text word for word:\n\n" + TEXT}]),
        "repeat (`llamalite bench`'s prompt, a text repeated: it goes on repeating)": bench_prompt(lm.tokenizer, 128)}
    for label, ids in tasks.items():
        print(f"\n## 1. {label}: default model, {len(ids)} prompt tokens, greedy, up to {GEN} tokens, "
              f"{args.threads} threads, median of {args.repeats}")
        one_task(args, lm, model, ids)


def one_task(args, lm, model, ids) -> None:
    from llamalite.generation.speculative import PromptLookup, Speculation

    configs = [("plain", None)] + [(f"--lookup {n} --draft-max {k}", (n, k)) for n in (2, 3) for k in (3, 5, 7)]
    rows = {name: [] for name, _ in configs}
    peers = {"llama.cpp plain": [], "llama.cpp lookup (ngram 2, 10 tokens)": [], "llama.cpp lookup (ngram 3, 7 tokens)": []}
    for _ in range(args.repeats):
        for name, cfg in configs:
            spec = Speculation(PromptLookup(cfg[0]), draft_max=cfg[1]) if cfg else None
            rows[name].append(ours(lm, ids, GEN, spec))
        peers["llama.cpp plain"].append(peer(model, ids, GEN, args.threads))
        peers["llama.cpp lookup (ngram 2, 10 tokens)"].append(peer(model, ids, GEN, args.threads, 2, 10))
        peers["llama.cpp lookup (ngram 3, 7 tokens)"].append(peer(model, ids, GEN, args.threads, 3, 7))
    plain = med(rows["plain"], "decode_tok_s")
    peer_plain = med(peers["llama.cpp plain"], "decode_tok_s")
    print("| run | tokens | decode tok/s | vs our plain | vs llama.cpp plain | acceptance | tokens a pass | same output |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        same = all(r["ids"] == rows["plain"][0]["ids"] for r in runs)
        acc = f"{med(runs, 'acceptance_rate'):.2f}" if "acceptance_rate" in runs[0] else ""
        tpp = f"{med(runs, 'tokens_per_pass'):.2f}" if "tokens_per_pass" in runs[0] else ""
        print(f"| llamalite {name} | {runs[0]['tokens']} | {med(runs, 'decode_tok_s'):.1f} | "
              f"{med(runs, 'decode_tok_s') / plain:.2f}x | {med(runs, 'decode_tok_s') / peer_plain:.2f}x | {acc} | "
              f"{tpp} | {same} |")
    for name, runs in peers.items():
        same = runs[0]["ids"] == rows["plain"][0]["ids"]
        print(f"| {name} | {runs[0]['tokens']} | {med(runs, 'decode_tok_s'):.1f} | "
              f"{med(runs, 'decode_tok_s') / plain:.2f}x | {med(runs, 'decode_tok_s') / peer_plain:.2f}x | | | "
              f"{same} |")


def draft_pair(args) -> None:
    import torch

    from llamalite.text.chat_template import encode_chat
    from llamalite.formats.load import load
    from llamalite.generation.speculative import DraftModel, Speculation
    from llamalite.formats.store import default_model_path

    torch.set_num_threads(args.threads)
    target, draft = load(args.pair), load(default_model_path())
    print(f"\n## 2. Draft pair: the default model drafting for {args.pair}")
    asks = ["Write a short story about a robot who learns to paint.", "Explain how a rainbow forms.",
            "List five tips for staying productive when working from home."]
    configs = [("plain", None)] + [(f"--draft-max {k} --draft-p-min {p}", (k, p)) for k in (2, 4, 7) for p in (0.0, 0.75)]
    print("| run | decode tok/s (median over prompts and repeats) | vs plain | acceptance | tokens a pass | same output |")
    print("|---|---|---|---|---|---|")
    plain_ids, plain_rate = {}, None
    for name, cfg in configs:
        runs = []
        for ask in asks:
            ids = encode_chat(target.chat_template, target.tokenizer, [{"role": "user", "content": ask}])
            for _ in range(args.repeats):
                spec = Speculation(DraftModel(draft.model, cfg[1]), draft_max=cfg[0]) if cfg else None
                draft.model.cache_tokens = []
                r = ours(target, ids, 128, spec)
                r["same"] = plain_ids.setdefault(ask, r["ids"]) == r["ids"]
                runs.append(r)
        rate = med(runs, "decode_tok_s")
        plain_rate = plain_rate or rate
        acc = f"{med(runs, 'acceptance_rate'):.2f}" if cfg else ""
        tpp = f"{med(runs, 'tokens_per_pass'):.2f}" if cfg else ""
        print(f"| {name} | {rate:.1f} | {rate / plain_rate:.2f}x | {acc} | {tpp} | {all(r['same'] for r in runs)} |")


def pass_costs(args) -> None:
    import torch

    from llamalite.formats.load import load
    from llamalite.formats.store import default_model_path

    torch.set_num_threads(args.threads)
    big, small = load(args.big), load(default_model_path())

    def step_ms(model, rows, reps):
        model.setup_caches(1, 1024)
        with torch.inference_mode():
            model(torch.tensor([list(range(100, 228))]), torch.arange(128))
            toks, pos = torch.tensor([[5]] * rows), torch.arange(128, 128 + rows)[:, None]
            z = torch.zeros(rows, dtype=torch.long)
            model(toks, pos, rows=z)
            t = time.perf_counter()
            for _ in range(reps):
                model(toks, pos, rows=z)
        return (time.perf_counter() - t) / reps * 1000

    cost = {b: step_ms(big.model, b, args.repeats + 1) for b in range(1, 9)}
    d = step_ms(small.model, 1, 50)
    print(f"\n## 3. One pass at the 7B shape ({args.big}), 128 tokens of context")
    print("| rows | pass ms | vs one row |")
    print("|---|---|---|")
    for b, ms in cost.items():
        print(f"| {b} | {ms:.0f} | {ms / cost[1]:.2f}x |")
    print(f"\nA draft step of the default model: {d:.1f} ms ({d / cost[1]:.3f} of a 7B step).\n")
    print("| K drafted | pass + drafts, vs one step | break-even acceptance | speed-up at a=0.6 | at a=0.8 |")
    print("|---|---|---|---|---|")
    for k in range(1, 8):
        spent = (cost[k + 1] + k * d) / cost[1]
        gain = lambda a: (1 - a ** (k + 1)) / (1 - a) / spent  # noqa: E731
        lo, hi = 0.0, 0.999
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if gain(mid) >= 1 else (mid, hi)
        print(f"| {k} | {spent:.2f}x | {hi:.2f} | {gain(0.6):.2f}x | {gain(0.8):.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pair", help="a bigger model of the default model's vocabulary (part 2)")
    p.add_argument("--big", help="the 7B-shape file of benchmarks/make_7b_gguf.py (part 3)")
    p.add_argument("--skip-copy", action="store_true")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        model, ids_file, gen, threads, lookup, k = args.worker
        print(json.dumps(peer_worker(model, ids_file, int(gen), int(threads), int(lookup), int(k))))
        return
    if not args.skip_copy:
        copy_task(args)
    if args.pair:
        draft_pair(args)
    if args.big:
        pass_costs(args)


if __name__ == "__main__":
    main()
