"""OpenAI's Responses API: POST /v1/responses (streamed with its typed events, or not), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items and POST /v1/responses/input_tokens, over the
same engine, chat templates, constrained decoding and tool calling as chat completions.

A request's input items become the chat template's messages: messages with text parts, `function_call`
items as an assistant turn's tool calls and `function_call_output` items as tool turns. A stored
response keeps its whole conversation (input and output, without its instructions, which OpenAI does
not carry over), so `previous_response_id` continues it; the store is in memory and bounded
(`ResponseStore`), the oldest response evicted first.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import Discriminator, Field, Tag

from ..generation.sampling import SamplingParams
from .calling import ToolCalling, check_strict, compile_grammar, encode_conversation, shown, tool_setup
from .core import Server, chat_logprobs, json_response
from .guard import clip
from .hub import Hub
from .protocol import APIError, JSONSchemaFormat, Strict, Text

LOGPROBS = "message.output_text.logprobs"
# What `include` may name: the output's log-probabilities are honoured; the rest belong to items (tool
# results, images, reasoning) this server never produces, so asking for them adds nothing.
INCLUDABLE = Literal["message.output_text.logprobs", "reasoning.encrypted_content", "file_search_call.results",
                     "web_search_call.results", "web_search_call.action.sources", "message.input_image.image_url",
                     "computer_call_output.output.image_url", "code_interpreter_call.outputs"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


# ----- request ------------------------------------------------------------------------------------------

class InputText(Strict):
    type: Literal["input_text"]
    text: Text


class OutputText(Strict):
    type: Literal["output_text"]
    text: Text
    annotations: list[Any] | None = Field(None, description="accepted; not shown to the model")
    logprobs: list[Any] | None = Field(None, description="accepted; not shown to the model")


class Refusal(Strict):
    type: Literal["refusal"]
    refusal: Text


Part = Annotated[InputText | OutputText | Refusal, Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[Part]
    id: Text | None = None
    status: ItemStatus | None = None
    phase: Text | None = Field(None, description="accepted on assistant turns; not shown to the model")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if not isinstance(p, Refusal) else p.refusal for p in self.content)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text = Field(description="the arguments as a JSON object, in text")
    id: Text | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text | list[InputText]
    id: Text | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _kind(value: Any, default: str | None = None) -> str | None:
    """A union member's `type`, for the discriminators below (None for one this server has no model of)."""
    return value.get("type", default) if isinstance(value, dict) else getattr(value, "type", None)


def _item_kind(value: Any) -> str | None:
    kind = _kind(value, "message")
    return kind if kind in ("message", "function_call", "function_call_output") else None


# A message may leave out its type (the "easy" input message); other item kinds name theirs.
Item = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")] |
                 Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                 Discriminator(_item_kind, custom_error_type="invalid_item",
                               custom_error_message="an input item is a message, a function_call or a "
                                                    "function_call_output (this server has no other tools)")]


class FunctionTool(Strict):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema for the arguments")
    strict: bool | None = Field(None, description="true: the parameters must be a strict schema (closed objects, every "
                                                  "key required), else a 400; a required call is constrained to them")


Tool = Annotated[Annotated[FunctionTool, Tag("function")],
                 Discriminator(lambda v: "function" if _kind(v) == "function" else None, custom_error_type="invalid_tool",
                               custom_error_message='tools here are functions ({"type": "function", "name": ..., '
                                                    '"parameters": {...}}); built-in tools (web_search, file_search, '
                                                    'code_interpreter, computer use, MCP) are not available')]


class FunctionChoice(Strict):
    type: Literal["function"]
    name: Text


class FormatText(Strict):
    type: Literal["text"]


class FormatJSONObject(Strict):
    type: Literal["json_object"]


class FormatJSONSchema(JSONSchemaFormat):
    type: Literal["json_schema"]


class TextConfig(Strict):
    format: Annotated[FormatText | FormatJSONObject | FormatJSONSchema, Field(discriminator="type")] | None = None
    verbosity: Literal["medium"] | None = Field(None, description="only medium: the model answers at its own length")


class Reasoning(Strict):
    effort: Literal["none"] | None = Field(None, description="these models do not reason before answering")
    summary: None = None


class StreamOptions(Strict):
    include_obfuscation: bool | None = Field(None, description="accepted; deltas are not padded")


class _Input(Strict):
    model: Text
    input: Text | Annotated[list[Item], Field(max_length=4096)] | None = None
    instructions: Text | None = Field(None, description="a system message before the input (not carried over "
                                                        "to a response that continues this one)")
    previous_response_id: Text | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    truncation: Literal["disabled", "auto"] = Field("disabled", description="auto: drop the oldest turns to fit")

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        if self.input is None:
            return []
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)

    def tool_mode(self) -> tuple[str, str | None]:
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if isinstance(choice, FunctionChoice):
            return "named", choice.name
        return choice, None

    def grammar_spec(self) -> tuple[str, Any, str] | None:
        fmt = self.text.format if self.text is not None else None
        if isinstance(fmt, FormatJSONObject):
            return "json_schema", {"type": "object"}, "text.format"
        if isinstance(fmt, FormatJSONSchema):
            if fmt.strict:
                check_strict(f"text.format '{clip(fmt.name, 64)}'", fmt.schema_, "text.format")
            return "json_schema", fmt.schema_, "text.format"
        return None


class ResponsesRequest(_Input):
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20, description=f"with include: ['{LOGPROBS}']")
    include: list[INCLUDABLE] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool = True
    background: Literal[False] | None = Field(None, description="responses run while the request is open")
    max_tool_calls: int | None = Field(None, ge=0, description="of built-in tools, which this server has none of")
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[Text, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="kept with the response; changes nothing")
    user: Text | None = Field(None, description="accepted; changes nothing")
    safety_identifier: Text | None = Field(None, description="accepted; changes nothing")
    service_tier: Text | None = Field(None, description="accepted; changes nothing")
    prompt_cache_key: Text | None = Field(None, description="accepted; the KV cache is reused by prefix anyway")
    prompt_cache_retention: Text | None = Field(None, description="accepted; the KV cache is reused by prefix anyway")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=0, min_p=0.0)

    def logprobs(self) -> int | None:
        """Top alternatives per output token when the output's log-probabilities are asked for, else None."""
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or []) else None


class InputTokensRequest(_Input):
    pass


# ----- the conversation ---------------------------------------------------------------------------------

def _messages(items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem]) -> list[dict[str, Any]]:
    """Input items as the chat template's messages (OpenAI chat's shape): consecutive function calls join
    the assistant turn before them, each output is a tool turn."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        else:
            parts = item.content if isinstance(item.content, list) else []
            if item.role != "assistant" and any(not isinstance(p, InputText) for p in parts):
                raise APIError(400, f"a {item.role} message's parts are input_text (output_text and refusal belong "
                                    "to assistant messages)", param="input")
            if item.role == "assistant" and any(isinstance(p, InputText) for p in parts):
                raise APIError(400, "an assistant message's parts are output_text or refusal", param="input")
            out.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
    return out


def _fit(server: Server, messages: list[dict[str, Any]], calling: ToolCalling | None, room: int,
         truncate: bool) -> list[int]:
    """The prompt's ids; with truncation "auto", the oldest turns after the system ones are dropped until it
    leaves `room` tokens of the context: the conversation then starts at the earliest user turn that fits
    (found by bisection, a few renderings however long the conversation)."""
    ids = encode_conversation(server, messages, calling)
    if not truncate or len(ids) + room <= server.engine.max_seq_len:
        return ids
    head = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    starts = [i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"]
    lo, hi, best = 0, len(starts) - 1, None
    while lo <= hi:  # a later start drops more turns, so the prompt only shrinks
        mid = (lo + hi) // 2
        cut = encode_conversation(server, messages[:head] + messages[starts[mid]:], calling)
        if len(cut) + room <= server.engine.max_seq_len:
            best, hi = cut, mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return best
    return encode_conversation(server, messages[:head] + messages[starts[-1]:], calling) if starts else ids


def _listed(item: MessageItem | FunctionCallItem | FunctionCallOutputItem) -> dict[str, Any]:
    """An input item as GET .../input_items lists it: with an id, a status, and a message's text as a part."""
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}[item.type]
    out = {"id": item.id or f"{prefix}_{uuid.uuid4().hex}", "status": "completed",
           **item.model_dump(exclude_none=True, by_alias=True, exclude={"id", "status"})}
    if isinstance(item, MessageItem) and isinstance(item.content, str):
        kind = "output_text" if item.role == "assistant" else "input_text"
        out["content"] = [{"type": kind, "text": item.content, **({"annotations": []} if kind == "output_text" else {})}]
    return out


def _chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(m["content"] or "") + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls", []))
               for m in messages)


class ResponseStore:
    """Stored responses in memory, oldest evicted first beyond `max_items` responses or `max_chars`
    characters of conversation (each counted whole, so shared history counts once per response: a
    conservative bound on what the store keeps alive)."""

    def __init__(self, max_items: int, max_chars: int):
        self.max_items, self.max_chars = max_items, max_chars
        self.entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.chars = 0

    def put(self, rid: str, response: dict[str, Any], messages: list[dict[str, Any]],
            items: list[dict[str, Any]]) -> None:
        if self.max_items <= 0:
            return
        size = _chars(messages)
        self.entries[rid] = {"response": response, "messages": messages, "items": items, "chars": size}
        self.chars += size
        while len(self.entries) > self.max_items or (self.chars > self.max_chars and len(self.entries) > 1):
            self.chars -= self.entries.popitem(last=False)[1]["chars"]

    def get(self, rid: str, param: str | None = None) -> dict[str, Any]:
        entry = self.entries.get(rid)
        if entry is None:
            kept = (f"this server keeps the last {self.max_items} responses in memory (not those created with "
                    "store: false, nor any from before a restart)") if self.max_items else \
                "this server stores no responses (llamalite serve --max-stored-responses 0)"
            raise APIError(404, f"no stored response has the id '{clip(rid, 64)}': {kept}; send the whole "
                                "conversation as input instead",
                           param=param, code="response_not_found", type="not_found_error" if param is None else
                           "invalid_request_error")
        return entry

    def delete(self, rid: str) -> None:
        self.get(rid)
        self.chars -= self.entries.pop(rid)["chars"]


# ----- routes -------------------------------------------------------------------------------------------

def router(hub: Hub) -> APIRouter:
    api = APIRouter()
    store = ResponseStore(hub.limits.max_stored_responses, hub.limits.max_stored_chars)

    def prepare(server: Server, body: _Input, room: int):
        """Checks that need no tokenizing, then (for a worker thread) the prompt and its constraint."""
        items = body.items()
        history = store.get(body.previous_response_id, "previous_response_id")["messages"] \
            if body.previous_response_id is not None else []
        new = _messages(items)
        system = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
        messages = system + history + new
        server.check_text("".join(m["content"] or "" for m in messages) if body.truncation == "disabled" else
                          "".join(m["content"] or "" for m in system + new[-1:]), "input")
        if len(messages) == len(system):
            raise APIError(400, "the input is empty: give a string or at least one item", param="input")
        spec = body.grammar_spec()
        mode, named = body.tool_mode()
        calling = tool_setup(server, [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                                      for t in body.tools or []], mode, named, body.parallel_tool_calls is not False,
                             any(m.get("tool_calls") or m["role"] == "tool" for m in messages), spec)

        def encode():
            ids = _fit(server, messages, calling, room, body.truncation == "auto")
            if calling is not None and calling.required:
                return ids, calling.grammar(server)
            return ids, compile_grammar(server, spec)
        return history + new, items, calling, encode

    @api.post("/v1/responses/input_tokens")
    async def input_tokens(body: InputTokensRequest):
        server = await hub.get(body.model)
        _, _, _, encode = prepare(server, body, 1)
        ids, _ = await server.offload(encode)
        return {"object": "response.input_tokens", "input_tokens": len(ids)}

    @api.post("/v1/responses")
    async def create(body: ResponsesRequest):
        server = await hub.get(body.model)
        conversation, items, calling, encode = prepare(server, body, body.max_output_tokens or 1)
        server.check_choices(1, "input")
        prompt, grammar = await server.offload(encode)
        if not prompt:
            raise APIError(400, "the rendered conversation is empty", param="input")
        budget = server.budget(len(prompt), body.max_output_tokens, "input", "max_output_tokens")
        logprobs = body.logprobs()
        stream = server.run(0, prompt, budget, body.sampling(), None, logprobs, [], grammar=grammar,
                            stop_when=calling.stop_when() if calling is not None else None)
        rid = f"resp_{uuid.uuid4().hex}"
        created = int(time.time())
        fmt = body.text.format if body.text is not None and body.text.format is not None else FormatText(type="text")
        mode, named = body.tool_mode()

        def response(status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                     error: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"id": rid, "object": "response", "created_at": created, "status": status, "background": False,
                    "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
                    else None, "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                    "max_tool_calls": body.max_tool_calls, "model": server.model_name, "output": output,
                    "parallel_tool_calls": body.parallel_tool_calls is not False,
                    "previous_response_id": body.previous_response_id,
                    "reasoning": {"effort": None, "summary": None}, "store": body.store,
                    "temperature": body.temperature, "top_p": body.top_p, "top_logprobs": body.top_logprobs or 0,
                    "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True), "verbosity": "medium"},
                    "tool_choice": {"type": "function", "name": named} if mode == "named" else mode,
                    "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
                    "truncation": body.truncation, "usage": usage, "user": body.user, "metadata": body.metadata or {}}

        def usage(generated: int, cached: int) -> dict[str, Any]:
            return {"input_tokens": len(prompt), "input_tokens_details": {"cached_tokens": cached},
                    "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": len(prompt) + generated}

        def finish(text: str, calls: list, status: str, generated: int, cached: int, tokens: list) -> dict[str, Any]:
            """The finished response (stored when asked), from the reply's text and calls."""
            calls_only = calling is not None and calling.required  # a reply of calls alone has no message
            output = [] if (calls or calls_only) and not text else [message_item(text, status, tokens)]
            output += [call_item(c, "completed") for c in calls]
            done = response(status, output, usage(generated, cached))
            if body.store:
                reply = {"role": "assistant", "content": text}
                if calls:
                    reply["tool_calls"] = [{"id": c.id, "type": "function",
                                            "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
                store.put(rid, done, conversation + [reply], [_listed(item) for item in items])
            return done

        message_id = f"msg_{uuid.uuid4().hex}"

        def message_item(text: str, status: str, tokens: list | None) -> dict[str, Any]:
            part = {"type": "output_text", "text": text, "annotations": []}
            if logprobs is not None:
                part["logprobs"] = chat_logprobs(server, tokens or [])["content"]
            return {"id": message_id, "type": "message", "status": status, "role": "assistant", "content": [part]}

        def call_item(call, status: str) -> dict[str, Any]:
            return {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "status": status,
                    "call_id": call.id, "name": call.name, "arguments": call.arguments if status == "completed" else ""}

        if body.stream:
            return StreamingResponse(_events(server, stream, calling, response, finish, message_item, call_item,
                                             logprobs is not None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        text, tokens, finish_reason, cached = "", [], None, 0
        async for piece in stream:
            text += piece.text
            tokens += piece.tokens
            if piece.finish_reason:
                finish_reason, cached = piece.finish_reason, piece.cached_tokens
        content, calls = calling.split(text) if calling is not None else (text, [])
        done = finish(content, calls, "incomplete" if finish_reason == "length" else "completed", len(tokens), cached,
                      tokens)
        return await json_response(server, lambda: done)

    @api.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str) -> dict[str, Any]:
        return store.get(response_id)["response"]

    @api.delete("/v1/responses/{response_id}")
    async def delete(response_id: str) -> dict[str, Any]:
        store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @api.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, limit: Annotated[int, Field(ge=1, le=100)] = 20,
                          order: Literal["asc", "desc"] = "desc", after: str | None = None) -> dict[str, Any]:
        """The response's own input items (not those of the responses before it), paged as OpenAI pages them."""
        items = store.get(response_id)["items"]
        items = items[::-1] if order == "desc" else list(items)
        if after is not None:
            ids = [i["id"] for i in items]
            if after not in ids:
                raise APIError(400, f"after names '{clip(after, 64)}', which is not an input item of this response",
                               param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    return api


async def _events(server: Server, stream, calling: ToolCalling | None, response, finish, message_item, call_item,
                  with_logprobs: bool):
    """The Responses stream: response.created and .in_progress; the message as an output item with one
    output_text part and its deltas; each function call as an item with its arguments; then
    response.completed (or .incomplete at max_output_tokens, .failed on an error). Every event carries
    its sequence_number."""
    seq = itertools.count()

    def event(kind: str, **data: Any) -> str:
        payload = json.dumps({"type": kind, "sequence_number": next(seq), **data}, ensure_ascii=False)
        return f"event: {kind}\ndata: {payload}\n\n"

    yield event("response.created", response=response("in_progress", [], None))
    yield event("response.in_progress", response=response("in_progress", [], None))
    split = calling.stream() if calling is not None else None
    message = message_item("", "in_progress", [])
    where = {"item_id": message["id"], "output_index": 0}
    opened, text, tokens, pending, generated = False, "", [], [], 0

    def entries(events) -> list[dict[str, Any]]:
        return chat_logprobs(server, events)["content"] if with_logprobs else []

    def open_message():
        yield event("response.output_item.added", output_index=0, item={**message, "content": []})
        yield event("response.content_part.added", **where, content_index=0,
                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

    try:
        async for piece in stream:
            generated += len(piece.tokens)
            tokens += piece.tokens
            pending += piece.tokens
            delta, calls = shown(split, piece)
            if delta:
                if not opened:
                    for e in open_message():
                        yield e
                    opened = True
                text += delta
                yield event("response.output_text.delta", **where, content_index=0, delta=delta,
                            logprobs=entries(pending))
                pending = []
            if not piece.finish_reason:
                continue
            status = "incomplete" if piece.finish_reason == "length" else "completed"
            if not opened and not calls:  # an empty reply is still a message
                for e in open_message():
                    yield e
                opened = True
            done = finish(text, calls, status, generated, piece.cached_tokens, tokens)
            index = 0
            if opened:
                item = done["output"][0]
                part = item["content"][0]
                yield event("response.output_text.done", **where, content_index=0, text=text,
                            logprobs=part.get("logprobs", []))
                yield event("response.content_part.done", **where, content_index=0, part=part)
                yield event("response.output_item.done", output_index=0, item=item)
                index = 1
            for call in calls:  # as OpenAI streams a call: the item, its arguments, the finished item
                item = call_item(call, "in_progress")
                yield event("response.output_item.added", output_index=index, item=item)
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=call.arguments)
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=call.name, arguments=call.arguments)
                yield event("response.output_item.done", output_index=index, item=call_item(call, "completed"))
                index += 1
            yield event("response.completed" if status == "completed" else "response.incomplete", response=done)
            return
    except APIError as e:  # the headers are gone: the failure travels as an event
        error = {"code": "server_error", "message": clip(e.message, 500)}
        yield event("response.failed", response=response("failed", [], None, error))
    finally:
        await stream.aclose()
