import pytest
import torch

from llamalite.store import ModelNotFoundError, default_model_path


@pytest.fixture(scope="session")
def default_model_file():
    try:
        return default_model_path()
    except ModelNotFoundError as e:  # the README's setup installs it; say so loudly rather than pass
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def default_lm(default_model_file):
    from llamalite.loading import load

    return load(default_model_file)


@pytest.fixture(scope="session")
def default_lm_exact(default_model_file):
    """The default model with every weight dequantized to fp32: the reference path."""
    from llamalite.loading import load

    return load(default_model_file, quantized=False)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
