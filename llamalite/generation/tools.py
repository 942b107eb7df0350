"""Tool calling: functions described to the model in its own format, its replies read back as calls.

A model learns one way to be told about tools and to call them. Where the chat template handles
tools itself (it reads the `tools` variable, as transformers' `apply_chat_template` passes it), the
template writes the prompt and the template's family says how calls come back. Where it does not, a
built-in format per family writes them into the messages:
- Hermes (ChatML models, the default one among them): the tools as JSON inside <tools></tools> in the
  system message, each call a JSON object {"name", "arguments"} inside <tool_call></tool_call>, each
  result inside <tool_response></tool_response> in a "tool" turn (NousResearch's Hermes function
  calling format, which Qwen 2.5 and SmolLM2's instruct data follow);
- Llama 3.1 / 3.2 JSON tool calls (meta-llama's prompt format for custom tools): the functions in the
  user's turn with an instruction to answer with {"name": ..., "parameters": ...}, results in
  "ipython" turns.

`required` or a named function is enforced with a grammar (the call's arguments match the function's
`parameters` schema); with `auto` the reply is parsed and a reply that is no call stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from .constrain import json_lark
from ..text.tokenizer import Tokenizer


class ToolError(ValueError):
    """Tools asked of a model with no known format, or tools that do not make sense."""


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"


def _arguments(call: dict[str, Any]) -> Any:
    """An assistant message's call arguments as a value (OpenAI sends them as a JSON string)."""
    args = call.get("function", call).get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def _functions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t["function"] for t in tools]


def _unique(calls: list[ToolCall]) -> list[ToolCall]:
    """The calls without exact repeats (same function, same arguments), the first of each kept: a small
    model allowed several calls can write the same one again and again, and running it twice gains nothing."""
    seen, out = set(), []
    for call in calls:
        key = (call.name, json.dumps(json.loads(call.arguments), sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(call)
    return out


class ToolFormat:
    """How one family is told about tools and calls them."""
    name = ""
    start = ""  # the text a call opens with: while a reply could still begin one, it is held back
    end = ""  # the text a call closes with: a new complete call can only appear where one is written

    def prepare(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages with the tools and the tool turns written in this format's terms."""
        raise NotImplementedError

    def calls(self, text: str, names: set[str], cut: bool) -> tuple[str | None, list[ToolCall]] | None:
        """(the text around the calls, every call in order, repeats too), or None when the reply is not
        a reply of well-formed calls. `cut`: the reply may end inside a call (a reply constrained to
        calls and cut by max_tokens or stopped); that unfinished call is left out, never read as text."""
        raise NotImplementedError

    def parse(self, text: str, names: set[str], cut: bool = False) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) from a reply; content None when the reply was only calls. A call that repeats
        an earlier one exactly is dropped (see `_unique`)."""
        found = self.calls(text, names, cut)
        if found is None or not found[1]:
            return (None if cut else text), []
        return found[0], _unique(found[1])

    def repeats(self, text: str, names: set[str]) -> bool:
        """Whether a complete call in the reply so far repeats an earlier one exactly: a reply that allows
        several calls stops there (the model would go on repeating it until max_tokens)."""
        found = self.calls(text, names, cut=True)
        return found is not None and len(_unique(found[1])) < len(found[1])

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) for a reply of calls to these tools only."""
        raise NotImplementedError


def _call_schema(function: dict[str, Any], arguments_key: str) -> dict[str, Any]:
    params = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: params},
            "required": ["name", arguments_key], "additionalProperties": False}


def _json_call(tools: list[dict[str, Any]], arguments_key: str) -> str:
    return json_lark({"anyOf": [_call_schema(f, arguments_key) for f in _functions(tools)]})


class Hermes(ToolFormat):
    name, start, end = "hermes", "<tool_call>", "</tool_call>"
    SYSTEM = ("You are a function calling AI model. You are provided with function signatures within <tools></tools> "
              "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
              "about what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
              "For each function call return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, "
              "\"arguments\": <args-dict>}}\n</tool_call>")
    CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def prepare(self, messages, tools):
        out = list(messages)
        if tools:
            system = self.SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": system + "\n\n" + (out[0]["content"] or "")}
            else:
                out.insert(0, {"role": "system", "content": system})
        result = []
        for m in out:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)},
                                                              ensure_ascii=False) + "\n</tool_call>"
                                  for c in m["tool_calls"])
                result.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()})
            elif m["role"] == "tool":
                result.append({"role": "tool", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
            else:
                result.append({"role": m["role"], "content": m.get("content") or ""})
        return result

    def calls(self, text, names, cut):
        calls = []
        for body in self.CALL.findall(text):
            try:
                value = json.loads(body)
            except json.JSONDecodeError:
                return None  # not a well-formed call: the reply is content
            if not isinstance(value, dict) or value.get("name") not in names:
                return None
            calls.append(ToolCall(value["name"], json.dumps(value.get("arguments", {}), ensure_ascii=False)))
        rest = self.CALL.sub("", text)
        if cut and self.start in rest:  # an unfinished call at the end
            rest = rest[:rest.index(self.start)]
        return rest.strip() or None, calls

    def grammar(self, tools, parallel):
        # A newline may follow the last call (ChatML models write one before ending the turn); it does
        # not commit the reply to another call.
        more = ' ("\\n" call)*' if parallel else ""
        return f'start: call{more} "\\n"?\ncall: "<tool_call>\\n" {_json_call(tools, "arguments")} "\\n</tool_call>"\n'


class Llama3JSON(ToolFormat):
    name, start, end = "llama3-json", "{", "}"
    INSTRUCTION = ("Given the following functions, please respond with a JSON for a function call with its proper "
                   "arguments that best answers the given prompt.\n\nRespond in the format {{\"name\": function name, "
                   "\"parameters\": dictionary of argument name and its value}}. Do not use variables.\n\n{tools}\n\n")

    def prepare(self, messages, tools):
        instruction = self.INSTRUCTION.format(tools="\n\n".join(json.dumps(t, indent=4, ensure_ascii=False)
                                                                for t in tools))
        result, told = [], not tools
        for m in messages:
            if m["role"] == "user" and not told:  # the functions go into the first user turn, as Meta's format does
                result.append({"role": "user", "content": instruction + (m.get("content") or "")})
                told = True
            elif m["role"] == "assistant" and m.get("tool_calls"):
                result.append({"role": "assistant", "content": "; ".join(
                    json.dumps({"name": c["function"]["name"], "parameters": _arguments(c)}, ensure_ascii=False)
                    for c in m["tool_calls"])})
            elif m["role"] == "tool":
                result.append({"role": "ipython", "content": m.get("content") or ""})
            else:
                result.append({"role": m["role"], "content": m.get("content") or ""})
        return result

    def calls(self, text, names, cut):
        """Calls are JSON objects separated by ';', the reply's whole text."""
        text, calls, at = text.strip(), [], 0
        if not text.startswith("{"):
            return None
        decoder = json.JSONDecoder()
        while True:
            try:
                value, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return (None, calls) if cut else None
            args = value.get("parameters", value.get("arguments")) if isinstance(value, dict) else None
            if not isinstance(value, dict) or value.get("name") not in names or not isinstance(args, dict):
                return None
            calls.append(ToolCall(value["name"], json.dumps(args, ensure_ascii=False)))
            rest = text[at:].lstrip()
            if not rest:
                return None, calls
            if not rest.startswith(";"):
                return (None, calls) if cut else None
            at = len(text) - len(rest) + 1
            while at < len(text) and text[at].isspace():
                at += 1

    def grammar(self, tools, parallel):
        more = ' ("; " call)*' if parallel else ""
        return f"start: call{more}\ncall: {_json_call(tools, 'parameters')}\n"


HERMES, LLAMA3_JSON = Hermes(), Llama3JSON()


def tool_format(template: str | None, tokenizer: Tokenizer) -> tuple[ToolFormat, bool]:
    """(the format, whether the template writes the tools itself) for a model; ToolError if none is known."""
    native = bool(template) and re.search(r"\btools\b", template) is not None
    if template and "<tool_call>" in template or (not native and tokenizer.token_id("<|im_start|>") is not None):
        return HERMES, native
    if tokenizer.token_id("<|start_header_id|>") is not None:
        return LLAMA3_JSON, native
    raise ToolError("this model's chat template does not handle tools, and its family has no known tool-call "
                    "format (llamalite knows Hermes-style <tool_call> for ChatML models and Llama 3.1's JSON calls)")


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that handles tools: call arguments as values, as transformers passes them."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{"type": "function", "id": c.get("id"),
                                      "function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


class ToolStream:
    """A streamed reply split into content to send now and calls read at the end.

    Text that could open a call (the format's `start`, and with Hermes anywhere in the reply, with
    Llama 3's JSON only at its beginning) is held back; once a call has opened, the rest of the reply
    is kept until it ends and then parsed. A reply that turns out not to be a call is sent as content
    after all."""

    def __init__(self, fmt: ToolFormat, names: set[str], calls_only: bool = False):
        self.fmt, self.names = fmt, names
        self.calls_only = calls_only  # constrained to calls: nothing is content
        self.held = ""  # text not sent yet
        self.in_call = calls_only
        self.sent_any = False

    def push(self, text: str) -> str:
        """Content that is safe to send now (maybe empty)."""
        self.held += text
        if self.in_call:
            return ""
        start = self.fmt.start
        if isinstance(self.fmt, Llama3JSON):
            if self.sent_any:
                return self._send(len(self.held))
            stripped = self.held.lstrip()
            if not stripped:
                return ""
            if stripped.startswith(start):
                self.in_call = True
                return ""
            return self._send(len(self.held))
        at = self.held.find(start)
        if at >= 0:
            self.in_call = True
            return self._send(at)
        keep = max((k for k in range(1, len(start)) if self.held.endswith(start[:k])), default=0)
        return self._send(len(self.held) - keep)

    def _send(self, upto: int) -> str:
        out, self.held = self.held[:upto], self.held[upto:]
        self.sent_any = self.sent_any or bool(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the content still to send, the calls) once the reply has ended. A reply constrained to calls
        has no content: a call cut short (max_tokens) is left out, never sent as text."""
        held, self.held = self.held, ""
        if not self.in_call:
            return held, []
        content, calls = self.fmt.parse(held, self.names, cut=self.calls_only)
        if self.calls_only:
            return "", calls
        if not calls:
            return held, []
        return content or "", calls


class RepeatGuard:
    """Says when a reply should stop because its latest complete call repeats an earlier one exactly (fed
    the reply's text piece by piece; it parses only when a call may just have closed)."""

    def __init__(self, fmt: ToolFormat, names: set[str]):
        self.fmt, self.names = fmt, names
        self.text, self._closed = "", 0

    def __call__(self, piece: str) -> bool:
        self.text += piece
        closed = self.text.count(self.fmt.end)
        if closed == self._closed:
            return False
        self._closed = closed
        return self.fmt.repeats(self.text, self.names)
