"""A model split over torchrun's processes (llamalite.distributed), two CPU processes over gloo, by heads
(tensor parallelism) or by layers (pipeline stages, --pp): the same logits and greedy tokens as one
process, on tiny random models and on the default model (whose three key/value-head groups split
2 + 1), each rank holding its share of the weights; served; the rules of the split and the errors
for what cannot be split."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalite.model.config import ModelConfig
from llamalite.distributed.group import ParallelError, Shard
from llamalite.distributed.tensor_parallel import Split
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

ROOT = Path(__file__).resolve().parent.parent.parent
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=256)


def _torchrun(n: int, *args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, input=stdin)


def test_the_split_deals_whole_head_groups_and_blocks():
    smol = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                       context_length=8192)
    first, second = (Split(smol, Shard(r, 2), w2_block=32, wo_block=32) for r in range(2))
    assert (first.heads, second.heads) == ((0, 2), (2, 3))  # 3 groups of 3 query heads: 2 + 1
    assert first.local_config().n_heads == 6 and second.local_config().n_kv_heads == 1
    assert first.ranges("layers.0.attention.wq.weight") == ((0, 384), None)
    assert second.ranges("layers.4.attention.wo.weight") == (None, (384, 576))
    assert second.ranges("layers.4.attention.wk.weight") == ((128, 192), None)
    assert first.hidden == (0, 768) and second.ranges("layers.0.feed_forward.w2.weight") == (None, (768, 1536))
    assert first.ranges("tok_embeddings.weight") == (None, None)  # replicated
    assert Split(CFG, Shard(1, 2), w2_block=32).hidden == (96, 160)  # 5 blocks: 3 + 2
    with pytest.raises(ParallelError, match="at most 3 ranks"):
        Split(smol, Shard(0, 4))
    with pytest.raises(ParallelError, match="blocks of 256"):  # K-quant blocks across a 384-column head split
        Split(smol, Shard(0, 2), wo_block=256)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    weights = {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model()).items()}
    return [write_gguf(d / f"tiny-{t}.gguf", weights, CFG, tensor_type=t) for t in ("F32", "Q8_0")]


def _runs(tmp_path, files, n, *flags):
    """The worker's results for each file: one process, and each rank of `n` under torchrun."""
    one, split = tmp_path / "one", tmp_path / "split"
    one.mkdir()
    split.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "tests/distributed/parallel_worker.py", str(one), *map(str, files)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _torchrun(n, "tests/distributed/parallel_worker.py", *flags, str(split), *map(str, files))
    assert done.returncode == 0, done.stderr[-3000:]
    return {Path(f).stem: (torch.load(one / f"{Path(f).stem}-0.pt"),
                           [torch.load(split / f"{Path(f).stem}-{r}.pt") for r in range(n)]) for f in files}


@pytest.mark.parametrize("flags", [(), ("--pp",)], ids=["heads", "layers"])
def test_two_ranks_equal_one_process_on_tiny_models(tiny_files, tmp_path, flags):
    for name, (one, ranks) in _runs(tmp_path, tiny_files, 2, *flags).items():
        # F32: only the order of the fp32 sums differs; Q8_0: the kernels also quantize each activation
        # block, and a sum that differs in its last bit can round a block's value the other way
        tol = 1e-5 if name.endswith("F32") else 1e-3
        for key in ("full", "pre", "step", "hidden", "long", "after"):
            for rank in ranks:  # every rank ends with the whole logits
                err = (rank[key] - one[key]).abs().max() / one[key].abs().max()
                assert err < tol, (name, key, float(err))
        assert all(r["tokens"] == one["tokens"] for r in ranks), name
        # split, it decodes with the kernels' one-call step (a stage's, by layers) wherever one process does
        assert one["plan"] == name.endswith("Q8_0") and all(r["plan"] == one["plan"] for r in ranks), name
        if not flags:
            assert all(r["transport"] == "shared memory" for r in ranks), name
        held = [r["held"]["layers"] for r in ranks]
        assert sum(held) == one["held"]["layers"] and max(held) <= 0.61 * one["held"]["layers"], (name, held)


def test_qwen2_and_qwen3_split_by_heads(tmp_path):
    """Qwen2's q/k/v biases cut with their rows, Qwen3's head norms whole on each rank: the same logits and
    greedy tokens as one process, both decoding with the kernels' one-call step."""
    from llamalite.formats.export import export_gguf
    from llamalite.backends import load
    from tests.helpers import save_hf_dir
    from tests.test_families import COMMON, FAMILIES

    transformers = pytest.importorskip("transformers")
    files = []
    for kind in ("qwen2", "qwen3"):
        config_cls, model_cls, extra, _ = FAMILIES[kind]
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**COMMON, **extra)).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                elif "bias" in name:
                    p.normal_(0, 0.5)
        lm = load(save_hf_dir(model, tmp_path / kind))
        files.append(export_gguf(lm.model, lm.tokenizer, tmp_path / f"{kind}-Q8_0.gguf", dtype="q8_0"))
    for name, (one, ranks) in _runs(tmp_path, files, 2).items():
        for key in ("full", "pre", "step", "hidden", "long", "after"):
            for rank in ranks:
                err = (rank[key] - one[key]).abs().max() / one[key].abs().max()
                assert err < 1e-3, (name, key, float(err))
        assert all(r["tokens"] == one["tokens"] for r in ranks), name
        assert one["plan"] and all(r["plan"] for r in ranks), name


def test_the_default_model_over_two_ranks(default_model_file, tmp_path):
    """SmolLM2-135M (Q4_1): its 3 head groups split 2 + 1 and its feed-forward in halves; the same logits
    (within the kernels' activation rounding), the same greedy tokens, and the layers' weights shared out."""
    (one, ranks), = _runs(tmp_path, [default_model_file], 2).values()
    for key in ("full", "pre", "step", "long", "after"):
        err = (ranks[0][key] - one[key]).abs().max() / one[key].abs().max()
        assert err < 1e-3, (key, float(err))
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == one["tokens"]
    assert one["plan"] and all(r["plan"] and r["transport"] == "shared memory" for r in ranks)
    held = [r["held"]["layers"] for r in ranks]
    assert sum(held) == one["held"]["layers"] and held[1] < held[0] < 0.62 * one["held"]["layers"]
    # and the memory it saves shows in each rank's peak RSS (the file's other slices never paged in)
    for r in ranks:
        saved_kb = (one["held"]["layers"] - r["held"]["layers"]) / 1024
        assert r["peak_rss_kb"] <= one["peak_rss_kb"] - 0.5 * saved_kb, (r["peak_rss_kb"], one["peak_rss_kb"], saved_kb)


def test_generate_under_torchrun(default_model_file):
    """`torchrun --nproc_per_node 2 -m llamalite generate [--pp]`: 32 greedy tokens as one process writes
    them, printed once; a prompt on stdin is rank 0's, shared with the other."""
    args = ["-m", "llamalite", "generate", "-t", "0", "-n", "32", "The capital of France is"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    for split in ([], ["--pp"]):
        two = _torchrun(2, *args[:-1], *split, args[-1])
        assert two.returncode == 0, two.stderr[-3000:]
        assert two.stdout == one.stdout and one.stdout.strip(), split
    piped = _torchrun(2, *args[:-1], stdin="The capital of France is")
    assert piped.stdout == one.stdout


def test_chat_under_torchrun():
    """`torchrun --nproc_per_node 2 -m llamalite chat [--pp]`: rank 0 holds the conversation (piped, two
    turns), the other rank follows each forward; the replies are one process's."""
    turns = "What is the capital of France?\nAnd of Italy?\n"
    args = ["-m", "llamalite", "chat", "-t", "0", "-n", "24"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, input=turns)
    assert one.returncode == 0 and len(one.stdout.strip().splitlines()) == 2, one.stderr[-2000:]
    for split in ([], ["--pp"]):
        two = _torchrun(2, *args, *split, stdin=turns)
        assert two.returncode == 0, two.stderr[-3000:]
        assert two.stdout == one.stdout, split


def test_what_cannot_be_split_is_refused(tiny_files, tmp_path):
    three = _torchrun(3, "-m", "llamalite", "generate", "--model", str(tiny_files[0]), "-n", "2", "hi", timeout=120)
    assert three.returncode != 0 and "at most 2 ranks" in three.stderr
    embed = _torchrun(2, "-m", "llamalite", "embed", "hi", timeout=120)
    assert embed.returncode != 0 and "runs in one process" in embed.stderr
    # each machine reads its own copy of the file: copies that differ are caught at load
    script = tmp_path / "mismatch.py"
    script.write_text("import sys\nfrom llamalite.backends import load\nfrom llamalite.distributed import from_env\n"
                      "shard = from_env()\nload(sys.argv[1 + shard.rank], shard=shard)\n")
    mixed = _torchrun(2, str(script), *map(str, tiny_files), timeout=120)
    assert mixed.returncode != 0 and "different model file than rank 0" in mixed.stderr


@pytest.mark.parametrize("n,reduce,expect", [(3, "auto", "shared memory"), (2, "group", "gloo")])
def test_the_kernels_all_reduce(tmp_path, n, reduce, expect, monkeypatch):
    """parallel.reducer: ranks on one machine sum through shared memory (in rank order, so every rank
    holds the same bits), or through the process group where told to (as across machines); a tensor
    larger than a slot is summed in pieces."""
    monkeypatch.setenv("LLAMALITE_TP_REDUCE", reduce)
    done = _torchrun(n, "tests/distributed/reducer_worker.py", "sum", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(n)]
    parts = ranks[0]["parts"]
    exact = parts[0].clone()
    for p in parts[1:]:
        exact += p
    for r in ranks:
        assert r["transport"] == expect
        assert torch.equal(r["large"], ranks[0]["large"]) and torch.equal(r["small"], r["large"][:5])
        assert torch.allclose(r["large"], exact, rtol=0, atol=1e-5)
    if reduce == "auto":
        assert torch.equal(ranks[0]["large"], exact)
    assert not list(Path("/dev/shm").glob("llamalite-tp-*"))  # the region's name is gone once all have mapped it


@pytest.mark.parametrize("mode,expect", [("exit", "rank 1 of the tensor-parallel group (process"),
                                         ("stall", "did not reach the same step within 2")])
def test_a_rank_that_is_gone_or_stuck_stops_the_others(mode, expect):
    """A rank waiting in the kernels' all-reduce notices within seconds that another rank's process has
    exited (no timeout needed), or gives up after the collective timeout when it is alive but stuck."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "tests/distributed/reducer_worker.py", mode, "2"], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        out, err = procs[0].communicate(timeout=120)  # rank 1 is not reaped meanwhile: a zombie counts as gone
        waited, _, message = out.strip().partition(" ")
        assert expect in message, (out, err[-2000:])
        assert float(waited) < (10 if mode == "exit" else 2 + 10), out
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("flags", [[], ["--pp"]], ids=["heads", "layers"])
def test_serve_split_over_two_ranks(client, flags):
    """`torchrun --nproc_per_node 2 -m llamalite serve [--pp]`: rank 0 serves and schedules, rank 1 follows
    each forward; greedy replies, streamed or not, two at once, and embeddings equal one process's."""
    import socket
    import signal

    from llamalite.serve import wait_until_serving

    openai = pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "llamalite", "serve", "--port", str(port), "--model-name", "smollm2", "--max-batch", "2",
                             "--ctx", "1024", *flags], env=env, cwd=ROOT, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, timeout=180)
        split = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        ask = dict(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
                   max_tokens=24, temperature=0)
        one = client.chat.completions.create(**ask).choices[0].message.content
        assert split.chat.completions.create(**ask).choices[0].message.content == one
        streamed = "".join(c.choices[0].delta.content or "" for c in split.chat.completions.create(**ask, stream=True)
                           if c.choices)
        assert streamed == one
        from concurrent.futures import ThreadPoolExecutor

        other = dict(ask, messages=[{"role": "user", "content": "Name a colour."}])
        alone = client.chat.completions.create(**other).choices[0].message.content
        with ThreadPoolExecutor(2) as pool:  # batched together on the split model
            both = list(pool.map(lambda a: split.chat.completions.create(**a).choices[0].message.content, [ask, other]))
        assert both == [one, alone]
        vectors = [torch.tensor(c.embeddings.create(model="smollm2", input=["a llama on a hill"]).data[0].embedding)
                   for c in (client, split)]
        assert torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0) > 0.9999
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_split_server_whose_rank_dies_stops_with_a_clear_error(victim):
    """Ranks started as torchrun would on two machines (no agent here to stop the others): SIGKILL one.
    Rank 1 killed: rank 0's next forward fails, the request gets an error instead of hanging, and the
    server stops, saying why. Rank 0 killed: rank 1 stops, saying why."""
    import signal
    import socket

    import httpx

    from llamalite.serve import wait_until_serving

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(ports[0]), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "llamalite", "serve", "--port", str(ports[1]),
                                       "--ctx", "512", "--model-name", "m"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    url = f"http://127.0.0.1:{ports[1]}"
    try:
        wait_until_serving(url, procs[0], timeout=180)
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        survivor = procs[1 - victim]
        if victim == 1:
            reply = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "Once upon a time",
                                                                "max_tokens": 8}, timeout=60)
            assert reply.status_code >= 500, reply.text
        _, err = survivor.communicate(timeout=60)
        assert survivor.returncode == 1, err[-3000:]
        assert ("cannot go on" if victim == 1 else "rank 1 of the split server stops") in err, err[-3000:]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair, 10.77.x.1 and 10.77.x.2: two hosts as torchrun sees
    them, on this machine. Needs root and iproute2 (.ci/run has both); skipped with the reason elsewhere."""
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    tag = f"ll{os.getpid() % 100000}"
    net = f"10.77.{os.getpid() % 250 + 1}"
    hosts = [(f"{tag}a", f"{tag}va", f"{net}.1"), (f"{tag}b", f"{tag}vb", f"{net}.2")]

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, addr in hosts:
            ip("netns", "add", ns)
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"could not set up network namespaces here: {e.stderr.strip()}")
    try:
        yield hosts
    finally:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("flags", [[], ["--pp"]], ids=["heads", "layers"])
def test_across_two_hosts(two_hosts, flags, default_model_file):
    """Two "machines" (network namespaces), one process each, meeting through torchrun's c10d
    rendezvous on the first one's address: the same 32 greedy tokens as one process."""
    args = ["-m", "llamalite", "generate", "-t", "0", "-n", "32", *flags, "The capital of France is"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    endpoint = f"{two_hosts[0][2]}:29531"
    procs = []
    for k, (ns, dev, addr) in enumerate(two_hosts):
        # The namespaces share this machine's hostname, which resolves to neither: each node is told its
        # own address (--local-addr) and whether it hosts the rendezvous, as a container setup would be.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": dev}
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "lltest",
             "--rdzv-conf", f"is_host={'true' if k == 0 else 'false'}", "--local-addr", addr, *args],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    if not flags:  # ranks on two machines (namespaces of their own) cannot share memory: gloo carries the sums
        assert "all-reduces through gloo" in outs[0][1], outs[0][1][-2000:]
    assert "".join(out for out, _ in outs) == one.stdout and one.stdout.strip()


def test_bench_under_torchrun_reports_each_rank(tiny_files):
    import json

    for flags, split in (([], "heads"), (["--pp"], "layers")):
        run = _torchrun(2, "-m", "llamalite", "bench", "--model", str(tiny_files[1]), "--json", "--repeats", "1",
                        "--prompt-tokens", "8", "--gen-tokens", "4", *flags, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        result = json.loads(run.stdout)  # printed once, by rank 0
        assert result["split"] == split and result["world"] == 2 and [r["rank"] for r in result["ranks"]] == [0, 1]
        assert result["all_reduce"] == ("shared memory" if split == "heads" else None)
        assert all(r["peak_rss_mib"] > 0 and 0 < r["collective_share"] < 1 for r in result["ranks"])


def test_a_mixture_of_experts_splits_by_layers(tmp_path):
    """Qwen3-MoE split by layers (--pp): each stage's experts on the kernels in its one-call step, the same
    logits and greedy tokens as one process; split by heads it is refused with what to do instead."""
    from llamalite.backends import load
    from llamalite.formats.export import export_gguf
    from tests.helpers import save_hf_dir
    from tests.test_experts import _build

    lm = load(save_hf_dir(_build("qwen3moe", num_hidden_layers=4), tmp_path / "m"))
    files = [export_gguf(lm.model, lm.tokenizer, tmp_path / "moe-Q8_0.gguf", dtype="q8_0")]
    (one, ranks), = _runs(tmp_path, files, 2, "--pp").values()
    for key in ("full", "pre", "step", "hidden", "long", "after"):
        for rank in ranks:
            err = (rank[key] - one[key]).abs().max() / one[key].abs().max()
            assert err < 1e-3, (key, float(err))
    assert all(r["tokens"] == one["tokens"] for r in ranks)
    assert one["plan"] and all(r["plan"] for r in ranks)
    with pytest.raises(ParallelError, match="mixture of experts.*--pp"):
        Split(lm.config, Shard(0, 2))
