"""Chat templates: the model's own Jinja template rendered the way transformers'
`apply_chat_template` renders it, or a built-in Llama 2 / Llama 3 format for a model without one."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

from .tokenizer import Tokenizer

# meta-llama/llama (Llama 2 chat_completion): system prompt folded into the first user turn.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# meta-llama/llama3 (ChatFormat): header, blank line, content, <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template failed to render (it raised, or the messages break its rules)."""


def builtin_template(tokenizer: Tokenizer) -> str:
    """Llama 3's format if the vocabulary has its header tokens, else Llama 2's."""
    return LLAMA3_TEMPLATE if tokenizer.token_id("<|start_header_id|>") is not None else LLAMA2_TEMPLATE


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """transformers' `{% generation %}` marks assistant text for masks; rendering keeps the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the model's chat template is not valid Jinja: {e}") from e


def render_chat(template: str | None, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    import jinja2

    compiled = _compile(template or builtin_template(tokenizer))
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, **kwargs)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed to render: {e}") from e
