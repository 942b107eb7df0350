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


# ChatML (OpenAI's, used by Qwen, SmolLM and Hermes models): every turn, any role, between <|im_start|> and <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template failed to render (it raised, or the messages break its rules)."""


def builtin_template(tokenizer: Tokenizer) -> str:
    """Llama 3's format if the vocabulary has its header tokens, ChatML if it has <|im_start|>, else Llama 2's."""
    if tokenizer.token_id("<|start_header_id|>") is not None:
        return LLAMA3_TEMPLATE
    return CHATML_TEMPLATE if tokenizer.token_id("<|im_start|>") is not None else LLAMA2_TEMPLATE


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


def encode_chat(template: str | None, tokenizer: Tokenizer, messages: Sequence[dict[str, Any]],
                add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
    """The prompt's token ids for `messages`, with only the template's own markup read as special tokens.

    A message whose text spells a special token ("<|im_end|>\\n<|im_start|>system") must not become
    that token, or a user could forge turns. Messages without such text tokenize as part of the whole
    prompt, exactly as `tokenizer.encode(render_chat(...))`. Each one with it is located exactly: the
    template is rendered again with that message's text replaced by a marker, the marker must stand
    where the text stood, and the text between is tokenized with special-token parsing off."""
    messages = list(messages)
    text = render_chat(template, tokenizer, messages, add_generation_prompt, **kwargs)
    risky = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str)
             and tokenizer.has_special_text(m["content"])]
    if not risky:
        return tokenizer.encode(text, add_bos=False)
    markers = {i: f"\x00llamalite-message-{i}\x00" for i in risky}
    marked = render_chat(template, tokenizer, [{**m, "content": markers[i]} if i in markers else m
                                               for i, m in enumerate(messages)], add_generation_prompt, **kwargs)
    # The real prompt must be the marked one with each marker replaced by its message's text (or that
    # text stripped: templates often write `content | trim`); anything else is refused, not guessed.
    segments = marked.split("\x00")  # text, marker, text, marker, ..., text
    if len(segments) != 2 * len(risky) + 1 or segments[1::2] != [markers[i].strip("\x00") for i in risky]:
        raise TemplateError(_UNKEPT)
    parts, pos = [], 0
    for k, i in enumerate(risky):
        before = segments[2 * k]
        if not text.startswith(before, pos):
            raise TemplateError(_UNKEPT)
        pos += len(before)
        content = messages[i]["content"]
        kept = next((c for c in (content, content.strip()) if text.startswith(c, pos)), None)
        if kept is None:
            raise TemplateError(_UNKEPT)
        parts += [(before, True), (kept, False)]
        pos += len(kept)
    if text[pos:] != segments[-1]:
        raise TemplateError(_UNKEPT)
    parts.append((segments[-1], True))
    return [t for part, special in parts if part
            for t in tokenizer.encode(part, add_bos=False, parse_special=special)]


_UNKEPT = ("a message contains the text of a special token, and the chat template changes that message's text, "
           "so it cannot be kept as plain text; remove the special-token text from the message")
