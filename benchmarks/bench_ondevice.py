"""An ExecuTorch program of the default model on this machine (XNNPACK) against llamalite's own kernels
on the GGUF file it came from and llama.cpp on that same file: prefill and decode tok/s, time to first
token, load, peak RSS and file size, each in a fresh process, alternating.

    python benchmarks/bench_ondevice.py PTE [PTE ...] [--model FILE.gguf] [--threads 2] [--repeats 3]

The programs come from `llamalite export <model> --to executorch --dtype fp32|8da4w --out X.pte`. On x86
these figures only orient: a phone's ARM cores and memory differ (and XNNPACK is tuned for ARM first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_vs_llamacpp import run  # a fresh process's last JSON line (this directory is on sys.path)

KEYS = ["prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("programs", nargs="+", help=".pte files")
    p.add_argument("--model", help="the GGUF file they came from (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    args = p.parse_args()
    from llamalite.eval.bench import bench_prompt
    from llamalite.formats.load import load_tokenizer
    from llamalite.formats.store import resolve_model

    gguf = str(resolve_model(args.model))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(bench_prompt(load_tokenizer(gguf), args.prompt_tokens), f)
    ours = lambda model: [sys.executable, "-m", "llamalite", "bench", "--model", model, "--json", "--repeats", "1",  # noqa: E731
                          "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                          "--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {"llamalite kernels (GGUF)": [], "llama.cpp (GGUF)": []}
    runs.update({f"ExecuTorch {Path(x).name}": [] for x in args.programs})
    peer = [sys.executable, str(Path(__file__).parent / "bench_vs_llamacpp.py"), "--threads", str(args.threads),
            "--worker", f.name, str(args.gen_tokens), gguf]
    for _ in range(args.repeats):
        runs["llamalite kernels (GGUF)"].append(run(ours(gguf)))
        runs["llama.cpp (GGUF)"].append(run(peer))
        for x in args.programs:
            runs[f"ExecuTorch {Path(x).name}"].append(run(ours(x)))
    sizes = {"llamalite kernels (GGUF)": Path(gguf).stat().st_size, "llama.cpp (GGUF)": Path(gguf).stat().st_size}
    sizes.update({f"ExecuTorch {Path(x).name}": Path(x).stat().st_size for x in args.programs})
    base = {k: statistics.median(r[k] for r in runs["llama.cpp (GGUF)"]) for k in KEYS}
    print(f"{args.prompt_tokens} prompt tokens, {args.gen_tokens} generated, {args.threads} threads, median of "
          f"{args.repeats}; ratios against llama.cpp")
    print("| run | file MiB | prefill tok/s | decode tok/s | TTFT s | load s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in KEYS}
        cells = [f"{med[k]:.1f} ({med[k] / base[k]:.2f}x)" if k != "ttft_s" and k != "load_s"
                 else f"{med[k]:.3f} ({med[k] / base[k]:.2f}x)" for k in KEYS]
        print(f"| {name} | {sizes[name] / 2**20:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
