import pytest
import torch

from llamalite.formats.store import ModelNotFoundError, default_model_path


@pytest.fixture(scope="session")
def default_model_file():
    try:
        return default_model_path()
    except ModelNotFoundError as e:  # the README's setup installs it; say so loudly rather than pass
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def default_lm(default_model_file):
    from llamalite.formats.load import load

    return load(default_model_file)


@pytest.fixture(scope="session")
def default_lm_exact(default_model_file):
    """The default model with every weight dequantized to fp32: the reference path."""
    from llamalite.formats.load import load

    return load(default_model_file, quantized=False)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def served(default_model_file):
    """`llamalite serve`'s app on the default model (8 slots of 1024 tokens) on 127.0.0.1: (url, Server)."""
    from llamalite.formats.load import load
    from llamalite.serve import BackgroundServer, Server, create_app

    server = Server(load(default_model_file), "smollm2", max_batch=8, max_seq_len=1024)
    with BackgroundServer(create_app(server)) as url:
        yield url, server


@pytest.fixture(scope="module")
def client(served):
    """The official `openai` client on `served`."""
    openai = pytest.importorskip("openai", reason="the test extras install openai: pip install -e '.[test]'")
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)
