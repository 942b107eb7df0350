"""What a generation request asks of the model's output, shared by the API families: a grammar or JSON
schema (constrain.Grammar), or tool calling (tools.ToolFormat), each checked and compiled."""

from __future__ import annotations

from typing import Any

from ..text.chat_template import TemplateError, encode_chat
from ..generation.constrain import Grammar, GrammarError, strict_problem
from ..generation.tools import RepeatGuard, ToolError, ToolFormat, ToolStream, native_messages, tool_format
from .core import Server
from .protocol import APIError
from .streaming import Piece
from .guard import clip


class ToolCalling:
    """A request's tools: how they reach the prompt, whether a call is required, how replies are read.
    `tools` are OpenAI-shaped ({"type": "function", "function": {"name", "description", "parameters"}}).

    A named function gets exactly one call, whatever `parallel` says (as vLLM answers it). Where several
    calls are allowed, a reply stops at a call that repeats an earlier one exactly, and the repeat is
    dropped: a small model would otherwise write the same call until max_tokens."""

    def __init__(self, fmt: ToolFormat, native: bool, tools: list[dict[str, Any]], required: bool,
                 named: str | None, parallel: bool):
        self.fmt, self.native, self.tools = fmt, native, tools
        self.parallel = parallel and named is None
        self.required = required
        self.callable = [t for t in tools if named is None or t["function"]["name"] == named]
        self.names = {t["function"]["name"] for t in self.callable}

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return native_messages(messages) if self.native else self.fmt.prepare(messages, self.tools)

    def template_kwargs(self) -> dict[str, Any]:
        return {"tools": self.tools} if self.native and self.tools else {}

    def grammar(self, server: Server) -> Grammar:
        try:
            return Grammar.lark(server.tokenizer, self.fmt.grammar(self.callable, self.parallel))
        except GrammarError as e:
            raise APIError(400, clip(str(e), 500), param="tools") from None

    def stream(self) -> ToolStream:
        return ToolStream(self.fmt, self.names, calls_only=self.required)

    def stop_when(self) -> RepeatGuard | None:
        """For Server.run: one reply's check that stops it at a repeated call (None where no call can be made)."""
        return RepeatGuard(self.fmt, self.names) if self.names else None

    def split(self, text: str) -> tuple[str, list]:
        """A whole reply as (content, calls), read as a stream of it would be."""
        stream = self.stream()
        content = stream.push(text)
        rest, calls = stream.finish()
        return content + rest, calls


def shown(split: ToolStream | None, piece: Piece) -> tuple[str, list]:
    """A piece's text as a client sees it while tool calls are held back (`split`, a reply's stream of
    ToolCalling.stream(), or None without tools), and the calls, found once the reply ends."""
    if split is None:
        return piece.text, []
    text = split.push(piece.text)
    if not piece.finish_reason:
        return text, []
    rest, calls = split.finish()
    return text + rest, calls


def encode_conversation(server: Server, messages: list[dict[str, Any]], calling: ToolCalling | None) -> list[int]:
    """The prompt's token ids for chat messages, with the request's tools written in (off the event loop:
    rendering and tokenizing a long conversation takes tens of milliseconds). Message text never
    becomes special tokens: only the template's own markup does."""
    try:
        if calling is None:
            return encode_chat(server.lm.chat_template, server.tokenizer, messages)
        return encode_chat(server.lm.chat_template, server.tokenizer, calling.messages(messages),
                           **calling.template_kwargs())
    except TemplateError as e:
        raise APIError(400, str(e), param="messages") from None


def tool_setup(server: Server, tools: list[dict[str, Any]], mode: str, named: str | None, parallel: bool,
               history: bool, spec: tuple[str, Any, str] | None, param: str = "tool_choice") -> ToolCalling | None:
    """The request's tool calling, checked; None without tools (or with mode "none") and no tool turns.
    mode: "auto", "none", "required" or "named" (a call to the function `named`); `param` names the
    choice field in errors; `spec` is the request's other constraint, if any."""
    if mode in ("required", "named"):
        if not tools:
            raise APIError(400, f"{param} asks for a call, but no tools were given", param=param)
        if mode == "named" and named not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"{param} names the function '{clip(named or '', 64)}', which is not in tools",
                           param=param)
        if spec is not None:
            raise APIError(400, f"a required tool call and {spec[2]} cannot both shape the reply; give one",
                           param=param)
    if spec is not None and tools and mode != "none":
        raise APIError(400, f"tools and {spec[2]} together are not supported: the reply cannot be both a call and "
                            f"constrained text; give one", param="tools")
    if mode == "none" and not history:
        return None
    try:
        fmt, native = tool_format(server.lm.chat_template, server.tokenizer)
    except ToolError as e:
        raise APIError(400, str(e), param="tools" if tools else "messages") from None
    tools = tools if mode != "none" else []
    for k, tool in enumerate(tools):  # each parameters schema must compile: the call may be constrained to it
        if tool["function"].get("strict"):
            check_strict(f"function '{clip(tool['function']['name'], 64)}'", tool["function"].get("parameters") or {},
                         "tools")
        try:
            Grammar.json_schema(server.tokenizer, tool["function"].get("parameters") or {"type": "object"})
        except GrammarError as e:
            raise APIError(400, f"tools[{k}] parameters: {clip(str(e), 400)}", param="tools") from None
    return ToolCalling(fmt, native, tools, mode in ("required", "named"), named if mode == "named" else None, parallel)


def check_strict(what: str, schema: Any, param: str) -> None:
    """A schema given with `strict: true` (`what` names whose: "function 'f'", "response_format 'r'") must be one
    as OpenAI's Structured Outputs defines (closed objects, every key required); otherwise a 400 naming the
    place, as OpenAI answers."""
    if (problem := strict_problem(schema)) is not None:
        raise APIError(400, f"invalid schema for {what}: {problem}", param=param)


def compile_grammar(server: Server, spec: tuple[str, Any, str] | None) -> Grammar | None:
    """The request's constraint compiled for the model's tokenizer (on a worker thread: up to ~1 s)."""
    if spec is None:
        return None
    kind, source, param = spec
    try:
        return Grammar.json_schema(server.tokenizer, source) if kind == "json_schema" else \
            Grammar.gbnf(server.tokenizer, source)
    except GrammarError as e:
        raise APIError(400, clip(str(e), 500), param=param) from None
