"""LoRA adapters served unmerged (llamalite.runtime.adapters): equal to the merged model, equal to PEFT's own
model for a PEFT adapter, the same through the kernels' one-call decode step, rows with different
adapters in one batch, a `llamalite finetune` run served without export, and the server's --lora."""

import json

import httpx
import pytest
import torch

from llamalite.runtime.adapters import AdapterSet
from llamalite.formats.adapters import AdapterError, read_adapter
from llamalite.model.config import ModelConfig
from llamalite.train.config import FinetuneConfig
from llamalite.formats.load import load
from llamalite.train.lora import apply_lora, lora_layers, merge_lora, save_adapter
from llamalite.kernels.ops import kernels_available
from tests.helpers import meta_weights_from_hf, save_hf_dir, tiny_hf_model, write_gguf

IDS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 7, 128, 5, 64, 200]])
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _pairs(model):
    """A LoRA-wrapped model's pairs as the server reads them: (A, B * scale) by (layer, target)."""
    return {(i, t): (m.lora_a.detach().clone(), m.lora_b.detach() * m.scale) for i, t, m in lora_layers(model)}


def _random_lora(model, targets=ALL, seed=1, rank=4):
    apply_lora(model, rank=rank, alpha=2 * rank, targets=targets, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, m in lora_layers(model):
            m.lora_b.normal_(0, 0.05, generator=g)
    return model


@pytest.fixture
def dense(tmp_path):
    return save_hf_dir(tiny_hf_model(), tmp_path / "base")


def test_unmerged_equals_merged_and_rows_choose(dense):
    tuned = [merge_lora(_random_lora(load(dense).model, seed=s)) for s in (1, 2)]
    served = load(dense).model
    adapters = AdapterSet(served)
    for s in (1, 2):
        assert adapters.add(f"a{s}", _pairs(_random_lora(load(dense).model, seed=s))) == s - 1
    base = load(dense).model
    batch = IDS.repeat(3, 1)
    with torch.no_grad():
        with adapters.use([0, None, 1]):  # three rows: adapter 0, the base, adapter 1
            mixed = served(batch)
        plain = served(batch)  # outside `use`: the base model
        torch.testing.assert_close(mixed[0], tuned[0](IDS)[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(mixed[1], base(IDS)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[2], tuned[1](IDS)[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(plain, base(batch), atol=1e-5, rtol=0)
        assert (mixed[0] - mixed[1]).abs().max() > 1e-2


def test_a_peft_adapter_equals_peft(dense, tmp_path):
    peft = pytest.importorskip("peft", reason="the test extras install peft")
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(dense)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(hf, config).eval()
    ref.save_pretrained(tmp_path / "adapter")
    served = load(dense)
    AdapterSet(served.model).add("peft", read_adapter(tmp_path / "adapter", served.model.config))
    with torch.no_grad(), served.model.adapters.use([0]):
        torch.testing.assert_close(served.model(IDS), ref(IDS).logits, atol=1e-4, rtol=0)
    # rsLoRA scales by alpha / sqrt(r)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             use_rslora=True)
    ref = peft.get_peft_model(LlamaForCausalLM.from_pretrained(dense), config).eval()
    ref.save_pretrained(tmp_path / "rs")
    served = load(dense)
    AdapterSet(served.model).add("rs", read_adapter(tmp_path / "rs", served.model.config))
    with torch.no_grad(), served.model.adapters.use([0]):
        torch.testing.assert_close(served.model(IDS), ref(IDS).logits, atol=1e-4, rtol=0)


@pytest.mark.skipif(not kernels_available(), reason="the C++ kernels are not built")
def test_the_kernels_decode_step_adds_the_adapters(tmp_path):
    """Quantized: DecodePlan.step_adapted against the modules' own path, rows of different adapters."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=256)
    path = write_gguf(tmp_path / "q.gguf", {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model()).items()},
                      cfg, tensor_type="Q8_0")
    dense = save_hf_dir(tiny_hf_model(), tmp_path / "hf")
    pairs = [_pairs(_random_lora(load(dense).model, seed=s)) for s in (1, 2)]
    pairs[1] = {k: v for k, v in pairs[1].items() if k[1] in ("wv", "w2")}  # an adapter of fewer layers
    models = []
    for _ in range(2):
        model = load(path).model
        assert model.plan is not None
        adapters = AdapterSet(model)
        for k, p in enumerate(pairs):
            adapters.add(f"a{k}", p)
        model.setup_caches(3, 64)
        models.append(model)
    models[1].plan = None  # the reference: attention and feed-forward modules, adapters as modules
    rows = [1, None, 0]
    with torch.no_grad():
        outs = []
        for model in models:
            with model.adapters.use(rows):
                for b in range(3):  # prefill each row alone (no plan: several tokens), then one batched step
                    with model.adapters.use([rows[b]]):
                        model(IDS, torch.arange(IDS.shape[1]), rows=torch.tensor([b]))
                outs.append(model(torch.tensor([[5], [9], [77]]), torch.full((3, 1), IDS.shape[1]),
                                  rows=torch.arange(3)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)
    with torch.no_grad():  # and the adapters change what they touch
        assert (outs[0][0] - outs[0][1]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny base model and a 4-step `llamalite finetune` LoRA run on it: (base dir, run dir)."""
    from llamalite.train.finetune import finetune

    d = tmp_path_factory.mktemp("finetune")
    base = save_hf_dir(tiny_hf_model(), d / "base")
    data = d / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i}:", "completion": f" value {i * 7}"}) + "\n"
                            for i in range(8)))
    finetune(FinetuneConfig(model=str(base), data=str(data), out=str(d / "run"), steps=4, batch_size=2, lr=3e-2,
                            lora_rank=4, targets="wq,wv,w2", lora_dropout=0.0, progress=False, save_every=2,
                            eval_every=2, val_every=4))
    return base, d / "run"


def test_a_finetune_run_is_served_without_export(run, tmp_path):
    from llamalite.train.restore import load_for_export

    base, out = run
    merged, _, _ = load_for_export(out, merge=True)
    served = load(base)
    AdapterSet(served.model).add("run", read_adapter(out, served.model.config, served.path))
    with torch.no_grad(), served.model.adapters.use([0]):
        torch.testing.assert_close(served.model(IDS), merged(IDS), atol=1e-4, rtol=0)
    other = save_hf_dir(tiny_hf_model(), tmp_path / "other")
    with pytest.raises(AdapterError, match="trained on base"):
        read_adapter(out, served.model.config, other)


def test_llamalite_serve_lora_serves_a_finetune_run(run):
    """The command line end to end: `llamalite serve --model BASE --lora tuned=RUN`."""
    import socket
    import subprocess
    import sys

    from llamalite.train.restore import load_for_export
    from llamalite.generation.tokens import generate
    from llamalite.generation.sampling import GREEDY
    from llamalite.serve import wait_until_serving

    openai = pytest.importorskip("openai")
    base, out = run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llamalite", "serve", "--model", str(base), "--lora",
                             f"tuned={out}", "--port", str(port), "--max-batch", "2", "--ctx", "128"],
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc, timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [(m.id, getattr(m, "parent", None)) for m in client.models.list().data] == [("base", None),
                                                                                           ("tuned", "base")]
        merged, tokenizer, _ = load_for_export(out, merge=True)
        prompt = tokenizer.encode("Item 3:")
        expected = tokenizer.decode(list(generate(merged, prompt, max_new_tokens=8, sampling=GREEDY,
                                                  stop_ids=tokenizer.end_ids)))
        tuned = client.completions.create(model="tuned", prompt="Item 3:", max_tokens=8, temperature=0)
        plain = client.completions.create(model="base", prompt="Item 3:", max_tokens=8, temperature=0)
        assert tuned.choices[0].text == expected != plain.choices[0].text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_adapters_that_do_not_fit_are_refused(dense, tmp_path):
    served = load(dense)
    wide = save_hf_dir(tiny_hf_model(hidden_size=96, intermediate_size=192), tmp_path / "wide")
    model = _random_lora(load(wide).model)
    save_adapter(model, tmp_path / "wide-adapter")
    with pytest.raises(AdapterError, match="trained for another model"):
        read_adapter(tmp_path / "wide-adapter", served.model.config)
    config = json.loads((tmp_path / "wide-adapter" / "adapter_config.json").read_text())
    (tmp_path / "wide-adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        read_adapter(tmp_path / "wide-adapter", served.model.config)
    with pytest.raises(AdapterError, match="neither a PEFT adapter"):
        read_adapter(tmp_path, served.model.config)


@pytest.mark.parametrize("weights", ["f32", "Q8_0"])
def test_the_server_batches_base_and_adapter_requests(dense, tmp_path, weights):
    """--lora as the hub serves it: the adapter is a model of its own; requests for it and for the base
    run together, each as it would alone; the slot cache is not shared across adapters. Quantized, the
    batched decode step is the kernels' one call."""
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from llamalite.serve import BackgroundServer, create_app
    from llamalite.serve.hub import Hub

    save_adapter(_random_lora(load(dense).model, seed=3), tmp_path / "adapter")
    path = dense
    if weights != "f32":
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160,
                          context_length=128)
        path = write_gguf(tmp_path / "q.gguf", {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model()).items()},
                          cfg, tensor_type=weights)
    hub = Hub({"base": lambda: load(path)}, adapters={"tuned": ("base", tmp_path / "adapter")}, max_batch=4)
    hub.load_all()
    with BackgroundServer(create_app(hub)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {"base", "tuned"} and cards["tuned"].parent == "base"

        def complete(model):
            r = client.completions.create(model=model, prompt="hello world", max_tokens=16, temperature=0)
            return r.choices[0].text

        alone = {m: complete(m) for m in ("base", "tuned")}
        assert alone["base"] != alone["tuned"]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(complete, ["base", "tuned", "tuned", "base"]))
        assert together == [alone["base"], alone["tuned"], alone["tuned"], alone["base"]]
        assert 'llamalite_generated_tokens_total{model="tuned"}' in httpx.get(url + "/metrics").text


def test_generate_with_lora_runs_the_fine_tune(run, capsys):
    """`llamalite generate --lora RUN`: the base run as its fine-tune, unmerged, as the merged model answers."""
    from llamalite.cli.main import main
    from llamalite.train.restore import load_for_export
    from llamalite.generation.tokens import generate
    from llamalite.generation.sampling import GREEDY

    base, out = run
    merged, tokenizer, _ = load_for_export(out, merge=True)
    expected = tokenizer.decode(list(generate(merged, tokenizer.encode("Item 5:"), max_new_tokens=8, sampling=GREEDY,
                                              stop_ids=tokenizer.end_ids)))
    assert main(["generate", "--model", str(base), "--lora", str(out), "-t", "0", "-n", "8", "Item 5:"]) == 0
    tuned = capsys.readouterr().out
    assert main(["generate", "--model", str(base), "-t", "0", "-n", "8", "Item 5:"]) == 0
    plain = capsys.readouterr().out
    assert expected in tuned and tuned != plain
    assert main(["generate", "--model", str(base), "--lora", str(base), "hi"]) == 1  # not an adapter: an error
    assert "neither a PEFT adapter" in capsys.readouterr().err
