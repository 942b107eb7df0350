"""lm-evaluation-harness: our `llamalite` model type inside lm-eval, compared with lm-eval's own
Hugging Face model type (transformers) on the same weights, and with `llamalite eval tasks`."""

import json
from pathlib import Path

import pytest

TASKS = Path(__file__).parent.parent.parent / "llamalite" / "eval" / "tasks" / "basic_facts.jsonl"


def _task_dir(tmp_path: Path) -> Path:
    """Our task file as an lm-eval task (a local JSON dataset, zero-shot multiple choice)."""
    folder = tmp_path / "tasks"
    folder.mkdir(parents=True)
    (folder / "basic_facts.yaml").write_text(f"""
task: llamalite_basic_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASKS}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return folder


def _run(model: str, model_args: str, tmp_path: Path, limit=None) -> tuple[dict, list[list[float]]]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import llamalite.eval.harness  # noqa: F401 (registers the model type)

    out = simple_evaluate(model=model, model_args=model_args, tasks=["llamalite_basic_facts"], limit=limit,
                          task_manager=TaskManager(include_path=str(_task_dir(tmp_path))), log_samples=True,
                          batch_size=1, device="cpu")
    samples = sorted(out["samples"]["llamalite_basic_facts"], key=lambda s: s["doc_id"])
    scores = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return out["results"]["llamalite_basic_facts"], scores


@pytest.mark.slow
def test_our_model_type_scores_like_lm_evals_transformers_model(default_lm_exact, tmp_path, monkeypatch):
    from llamalite.eval.scoring import encode_pair, loglikelihood, multiple_choice, read_tasks
    from llamalite.formats.export import export_hf

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf_dir = export_hf(default_lm_exact.model, default_lm_exact.tokenizer, tmp_path / "hf")
    theirs, their_scores = _run("hf", f"pretrained={hf_dir},dtype=float32", tmp_path / "a")
    ours, our_scores = _run("llamalite", f"model={default_lm_exact.path},dequantize=true", tmp_path / "b")
    # the same weights: every choice's log-likelihood agrees, and so do the metrics
    assert len(our_scores) == len(their_scores) == 40
    for mine, other in zip(our_scores, their_scores):
        assert mine == pytest.approx(other, abs=2e-3)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == theirs[metric], metric
        assert ours[metric.replace(",", "_stderr,")] == pytest.approx(theirs[metric.replace(",", "_stderr,")])
    # `llamalite eval tasks` (our own scorer) reports the same figures lm-eval computes
    items = read_tasks(TASKS)
    report = multiple_choice(default_lm_exact.model, default_lm_exact.tokenizer, items, progress=False)
    assert report["acc"] == theirs["acc,none"] and report["acc_norm"] == theirs["acc_norm,none"]
    assert report["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"])
    item = items[0]
    ctx, cont = encode_pair(default_lm_exact.tokenizer, item.context, item.delimiter + item.choices[0])
    assert loglikelihood(default_lm_exact.model, ctx, cont)[0] == pytest.approx(their_scores[0][0], abs=2e-3)


def test_lm_eval_command_line_runs_our_model_type(tmp_path, monkeypatch, default_model_file):
    from llamalite.cli.main import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "results"
    assert main(["lm-eval", "--model", "llamalite", "--model_args", f"model={default_model_file}",
                 "--tasks", "llamalite_basic_facts", "--include_path", str(_task_dir(tmp_path)), "--limit", "4",
                 "--output_path", str(out)]) == 0
    results = json.loads(next(out.rglob("results*.json")).read_text())["results"]["llamalite_basic_facts"]
    assert 0 <= results["acc,none"] <= 1 and results["alias"] == "llamalite_basic_facts"


def test_lm_evals_local_completions_scores_through_our_server(default_lm, tmp_path, monkeypatch):
    """`llamalite serve` as lm-eval's `local-completions` backend: remote tokenizer (/tokenizer_info,
    /tokenize), prompt scoring by echo + logprobs; the log-likelihoods equal a direct computation."""
    from llamalite.eval.scoring import loglikelihood, read_tasks
    from llamalite.serve import BackgroundServer, Server, create_app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # an fp32 KV cache, as the direct computation attends in fp32 (the default f16 cache rounds keys
    # and values: about 1e-3 of a log-likelihood summed over a few tokens)
    monkeypatch.setattr(default_lm.model, "kv_type", "f32")
    server = Server(default_lm, "smollm2", max_batch=4, max_seq_len=512)
    with BackgroundServer(create_app(server)) as url:
        results, scores = _run("local-completions", f"model=smollm2,base_url={url}/v1/completions,"
                               "tokenizer_backend=remote,tokenized_requests=True,num_concurrent=1,max_retries=1",
                               tmp_path, limit=6)
    assert len(scores) == 6
    tok = default_lm.tokenizer
    for item, got in zip(read_tasks(TASKS), scores):
        for choice, score in zip(item.choices, got):
            # lm-eval tokenized context and continuation itself, through our /tokenize
            ctx = tok.encode(item.context, add_bos=None)
            whole = tok.encode(item.context + item.delimiter + choice, add_bos=None)
            assert score == pytest.approx(loglikelihood(default_lm.model, ctx, whole[len(ctx):])[0], abs=2e-3)
    assert 0 <= results["acc,none"] <= 1
