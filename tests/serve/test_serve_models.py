"""Several models in one server (serve.hub.Hub): listing, routing by the request's model field, each
model's output the same as when served alone, loading on first use with --max-loaded, and the
command line's --model NAME=PATH."""

import argparse
import threading
import time

import httpx
import pytest

from llamalite.model.config import ModelConfig
from llamalite.formats.load import load
from llamalite.serve import BackgroundServer, Server, create_app
from llamalite.serve.hub import Hub
from tests.helpers import meta_weights_from_hf, tiny_hf_model, write_gguf

openai = pytest.importorskip("openai", reason="the test extras install openai")

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, hidden_dim=160, context_length=256)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny random models (different weights, the same shape and tokenizer) as GGUF files."""
    d = tmp_path_factory.mktemp("models")
    return {name: write_gguf(d / f"{name}.gguf", {k: v.numpy() for k, v in meta_weights_from_hf(tiny_hf_model(seed)).items()},
                             CFG, tensor_type="Q8_0")
            for name, seed in (("alpha", 0), ("beta", 1))}


def _greedy(client, model, prompt="hello there", n=12):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
    return r.choices[0].text, r.usage.completion_tokens


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_two_models_route_by_name_and_answer_as_alone(files):
    alone = {}
    for name, path in files.items():
        with BackgroundServer(create_app(Server(load(path), name, max_batch=2))) as url:
            alone[name] = _greedy(_client(url), name)
    assert alone["alpha"] != alone["beta"]  # different weights, so routing is visible
    hub = Hub({name: (lambda p=path: load(p)) for name, path in files.items()}, max_batch=2)
    hub.load_all()
    with BackgroundServer(create_app(hub)) as url:
        client = _client(url)
        assert [m.id for m in client.models.list().data] == ["alpha", "beta"]
        assert client.models.retrieve("beta").context_length == 256
        for name in files:
            assert _greedy(client, name) == alone[name]
        chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert chat.model == "beta"
        with pytest.raises(openai.NotFoundError, match="'alpha', 'beta'"):
            client.completions.create(model="gamma", prompt="x", max_tokens=1)
        tokens = httpx.post(url + "/tokenize", json={"model": "beta", "content": "hello"}).json()["tokens"]
        assert tokens == httpx.post(url + "/tokenize", json={"content": "hello"}).json()["tokens"]
        metrics = httpx.get(url + "/metrics").text
        assert 'llamalite_generated_tokens_total{model="alpha"}' in metrics
        assert 'llamalite_generated_tokens_total{model="beta"}' in metrics


def test_max_loaded_loads_on_first_use_and_keeps_streaming(files):
    loading = threading.Event()

    def slow_beta():
        loading.set()
        time.sleep(1.0)  # a load long enough to see that alpha's stream goes on meanwhile
        return load(files["beta"])

    hub = Hub({"alpha": lambda: load(files["alpha"]), "beta": slow_beta}, max_loaded=1, max_batch=2)
    hub.servers["alpha"] = hub.build("alpha")
    with BackgroundServer(create_app(hub)) as url:
        client = _client(url)
        assert [(m.id, m.loaded) for m in client.models.list().data] == [("alpha", True), ("beta", False)]
        expected = client.completions.create(model="alpha", prompt="once", max_tokens=200, temperature=0).choices[0].text
        arrivals: list[float] = []
        text: list[str] = []

        def stream_alpha():
            for chunk in client.completions.create(model="alpha", prompt="once", max_tokens=200, temperature=0,
                                                   stream=True):
                arrivals.append(time.monotonic())
                text.append(chunk.choices[0].text)

        reader = threading.Thread(target=stream_alpha)
        reader.start()
        while not arrivals:
            time.sleep(0.01)
        started = time.monotonic()
        beta = client.completions.create(model="beta", prompt="x", max_tokens=2)  # waits for beta's load
        loaded = time.monotonic()
        reader.join(timeout=60)
        assert loading.is_set() and beta.model == "beta" and loaded - started >= 1.0
        assert "".join(text) == expected  # alpha was unloaded while streaming, and finished first
        assert any(started < t < loaded for t in arrivals)  # the load blocked neither the loop nor the engine
        assert [(m.id, m.loaded) for m in client.models.list().data] == [("alpha", False), ("beta", True)]
        assert client.completions.create(model="alpha", prompt="once", max_tokens=200,
                                         temperature=0).choices[0].text == expected  # loaded again


def test_a_model_that_fails_to_load_is_a_503_and_the_rest_serve(files):
    def broken():
        raise ValueError("the file is corrupt")

    hub = Hub({"alpha": lambda: load(files["alpha"]), "broken": broken}, max_loaded=2, max_batch=1)
    hub.servers["alpha"] = hub.build("alpha")
    with BackgroundServer(create_app(hub)) as url:
        client = _client(url)
        with pytest.raises(openai.InternalServerError, match="could not be loaded: the file is corrupt"):
            client.completions.create(model="broken", prompt="x", max_tokens=1)
        assert _greedy(client, "alpha")[1] >= 1


def test_the_command_line_names_models(files):
    from llamalite.cli.serve import served_models as _served_models

    def parse(*models, name=None):
        return _served_models(argparse.Namespace(model=list(models), model_name=name))

    assert parse(str(files["alpha"])) == {"alpha": files["alpha"]}
    assert parse(f"a={files['alpha']}", f"b={files['beta']}") == {"a": files["alpha"], "b": files["beta"]}
    assert parse(str(files["beta"]), name="mine") == {"mine": files["beta"]}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse(str(files["alpha"]), str(files["alpha"]))
    with pytest.raises(ValueError, match="single model"):
        parse(str(files["alpha"]), str(files["beta"]), name="x")


def test_the_command_line_names_adapters(files, tmp_path):
    from llamalite.cli.serve import served_adapters as _served_adapters

    models = {"alpha": files["alpha"], "beta": files["beta"]}

    def parse(*specs):
        return _served_adapters(argparse.Namespace(lora=list(specs)), models)

    assert parse(f"tuned={tmp_path}") == {"tuned": ("alpha", tmp_path)}  # on the first model by default
    assert parse(f"tuned={tmp_path}@beta") == {"tuned": ("beta", tmp_path)}
    for spec, words in ((f"tuned={tmp_path}@gamma", "no model 'gamma'"), (f"alpha={tmp_path}", "already a served name"),
                        ("tuned=/nowhere/at/all", "does not exist"), (str(tmp_path), "NAME=PATH")):
        with pytest.raises(ValueError, match=words):
            parse(spec)
