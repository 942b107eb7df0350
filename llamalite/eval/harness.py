"""lm-evaluation-harness model type `llamalite`: any model llamalite loads, scored by lm-eval's own
tasks and metrics.

    llamalite lm-eval --model llamalite --model_args model=PATH --tasks hellaswag
    python -c "import llamalite.eval.harness, lm_eval; lm_eval.simple_evaluate(model='llamalite', ...)"

lm-eval finds external model types only once they are imported (it has no plugin entry point), so
`llamalite lm-eval` imports this module and then runs lm-eval's own command line. Model arguments:
`model` (a path or store name; default: the default model), `dequantize` (true: score with fp32
weights instead of the quantized kernels), `max_length`, `threads`.

Tokenization follows lm-eval's Hugging Face model type: the tokenizer's own BOS rule, special-token
text parsed, context and continuation split as `TemplateLM._encode_pair` does.
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401 (lm-eval's own types first: it loads them only into an empty registry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .scoring import loglikelihood


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("llamalite")
class LlamaliteLM(TemplateLM):
    def __init__(self, model: str | None = None, dequantize: Any = False, max_length: int | None = None,
                 threads: int | None = None, device: str | None = None, batch_size: Any = 1, **_: Any):
        super().__init__()
        from ..backends import load
        from ..formats.store import resolve_model

        if threads:
            torch.set_num_threads(int(threads))
        self.device_name = device or "cpu"
        if self.device_name.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI asks for cuda
            print(f"llamalite: device {self.device_name} is not available here; evaluating on the CPU", file=sys.stderr)
            self.device_name = "cpu"
        self.lm = load(resolve_model(model), device=self.device_name, quantized=not _flag(dequantize))
        self.model, self.tokenizer = self.lm.model, self.lm.tokenizer
        self.max_length = int(max_length or self.model.config.context_length)
        if self.tokenizer.eos_id is None:
            raise ValueError(f"{self.lm.path} has no end-of-text token, which lm-eval needs")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS where the model has one (as lm-eval's HF model type)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False  # it already starts with BOS
        return self.tokenizer.encode(string, add_bos=add_special_tokens, parse_special=True)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        # the last max_length tokens are what the model sees, as lm-eval truncates from the left
        whole = (context + continuation)[-(self.max_length + 1):]
        return loglikelihood(self.model, whole[:len(whole) - len(continuation)], continuation, self.device_name)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="log-likelihoods", disable=disable_tqdm or self.rank != 0):
            (_, context, continuation) = request
            result = self._score(context, continuation)
            out.append(result)
            if request[0] is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods, scored in disjoint windows of max_length tokens (as lm-eval)."""
        out = []
        for request in tqdm(requests, desc="rolling log-likelihoods", disable=disable_tqdm or self.rank != 0):
            (text,) = request.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..generation.tokens import generate
        from ..generation.stream import stream_text
        from ..generation.sampling import SamplingParams

        out = []
        for request in tqdm(requests, desc="generating", disable=disable_tqdm or self.rank != 0):
            context, kwargs = request.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = _flag(kwargs.pop("do_sample", False))
            sampling = SamplingParams(temperature=float(kwargs.pop("temperature", 1.0)) if sample else 0.0,
                                      top_k=0, top_p=float(kwargs.pop("top_p", 1.0)), min_p=0.0)
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]
            tokens = generate(self.model, prompt, max_new_tokens=max_new, sampling=sampling,
                              stop_ids=sorted(self.tokenizer.end_ids))
            text = "".join(stream_text(self.tokenizer, tokens, stop=until))
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, {"until": until}), text)
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line, with the `llamalite` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
