"""Anthropic's Messages API: POST /v1/messages (streamed with Anthropic's events, or not) and POST
/v1/messages/count_tokens, over the same engine, chat templates and tool calling as chat completions,
with Anthropic's error shape (guard.error_body) and its `x-api-key` header (guard.Guard).

A conversation of content blocks becomes the chat template's messages: text blocks are joined,
`tool_use` blocks become an assistant turn's tool calls and `tool_result` blocks become tool turns, so
a tool round trip reads the same to the model whichever API the client speaks.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import Field

from ..generation.sampling import SamplingParams
from .calling import encode_conversation, shown, tool_setup
from .core import Server, json_response
from .guard import clip
from .hub import Hub
from .protocol import MAX_STOP, APIError, Strict, Text


class TextBlock(Strict):
    type: Literal["text"]
    text: Text
    cache_control: dict[str, Any] | None = Field(None, description="accepted; the prefix cache works by itself")
    citations: list[Any] | None = Field(None, description="accepted on assistant turns; not shown to the model")


class ToolUseBlock(Strict):
    """A call the model made, resent in the conversation. `caller` and `toolset_name` are the SDK's
    bookkeeping on the blocks it returns (who invoked the tool; the toolset family of a toolset member), so
    a client resending `block.model_dump()` sends them: they say nothing the model reads, and change nothing."""
    type: Literal["tool_use"]
    id: Text
    name: Text
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    caller: dict[str, Any] | None = Field(None, description="accepted; the SDK's bookkeeping, changes nothing")
    toolset_name: Text | None = Field(None, description="accepted; the SDK's bookkeeping, changes nothing")


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: Text
    content: Text | list[TextBlock] = ""
    is_error: bool | None = Field(None, description="shown to the model as a result that begins with 'Error: '")
    cache_control: dict[str, Any] | None = None
    toolset_name: Text | None = Field(None, description="accepted; the SDK's bookkeeping, changes nothing")

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return ("Error: " + body) if self.is_error else body


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: Text | list[Block]


class Tool(Strict):
    type: Literal["custom"] | None = Field(None, description="a client tool (the SDK's ToolParam may say so)")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Text | None = None
    input_schema: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    strict: bool | None = Field(None, description="true: input_schema must be a strict schema (closed objects, "
                                                  "every key required), else a 400")


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: Text | None = None
    disable_parallel_tool_use: bool | None = None


class Metadata(Strict):
    user_id: Text | None = None


class _Conversation(Strict):
    model: Text
    messages: list[Message] = Field(min_length=1)
    system: Text | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None

    def system_text(self) -> str | None:
        if self.system is None:
            return None
        return self.system if isinstance(self.system, str) else "\n".join(b.text for b in self.system)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation as the chat template's messages (OpenAI's shape: tool_calls, tool turns)."""
        out: list[dict[str, Any]] = []
        if self.system_text() is not None:
            out.append({"role": "system", "content": self.system_text()})
        for m in self.messages:
            if isinstance(m.content, str):
                out.append({"role": m.role, "content": m.content})
                continue
            text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in m.content if isinstance(b, ToolUseBlock)]
            results = [b for b in m.content if isinstance(b, ToolResultBlock)]
            if m.role == "user" and calls:
                raise APIError(400, "tool_use blocks belong to assistant turns", param="messages")
            if m.role == "assistant" and results:
                raise APIError(400, "tool_result blocks belong to user turns", param="messages")
            out += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()} for b in results]
            if calls:
                out.append({"role": "assistant", "content": text, "tool_calls": calls})
            elif text or not results:
                out.append({"role": m.role, "content": text})
        return out

    def openai_tools(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": t.name, **({"description": t.description}
                                                                     if t.description else {}),
                                                  "parameters": t.input_schema, **({"strict": True} if t.strict else {})}}
                for t in self.tools or []]

    def tool_mode(self) -> tuple[str, str | None, bool]:
        """(mode, named function, parallel) in tool_setup's terms."""
        choice = self.tool_choice or ToolChoice(type="auto")
        mode = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}[choice.type]
        if choice.type == "tool" and not choice.name:
            raise APIError(400, "tool_choice of type tool needs the tool's name", param="tool_choice")
        return (mode if self.tools or mode != "auto" else "none"), choice.name, not choice.disable_parallel_tool_use


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: Metadata | None = Field(None, description="accepted; changes nothing")
    service_tier: Text | None = Field(None, description="accepted; changes nothing")

    def sampling(self) -> SamplingParams:
        # Anthropic's own defaults: no top-k, top-p or min-p unless asked for.
        return SamplingParams(temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p or 1.0,
                              min_p=0.0)


class CountTokensRequest(_Conversation):
    pass


def router(hub: Hub) -> APIRouter:
    api = APIRouter()

    def prepare(server: Server, body: _Conversation):
        messages = body.chat_messages()
        server.check_text("".join(m["content"] or "" for m in messages), "messages")
        mode, named, parallel = body.tool_mode()
        calling = tool_setup(server, body.openai_tools(), mode, named, parallel,
                             any(m.get("tool_calls") or m["role"] == "tool" for m in messages), None)

        def encode():
            ids = encode_conversation(server, messages, calling)
            return ids, calling.grammar(server) if calling is not None and calling.required else None
        return calling, encode

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest):
        server = await hub.get(body.model)
        _, encode = prepare(server, body)
        ids, _ = await server.offload(encode)
        return {"input_tokens": len(ids)}

    @api.post("/v1/messages")
    async def messages(body: MessagesRequest):
        server = await hub.get(body.model)
        stop = server.check_stop(list(body.stop_sequences or []))
        server.check_choices(1, "messages")
        calling, encode = prepare(server, body)
        prompt, grammar = await server.offload(encode)
        if not prompt:
            raise APIError(400, "the rendered conversation is empty", param="messages")
        budget = server.budget(len(prompt), body.max_tokens)
        stream = server.run(0, prompt, budget, body.sampling(), None, None, stop, grammar=grammar,
                            stop_when=calling.stop_when() if calling is not None else None)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        head = {"id": mid, "type": "message", "role": "assistant", "model": server.model_name}

        def stop_reason(finish: str | None, stop_string: str | None, calls: list) -> tuple[str, str | None]:
            if calls and finish == "stop":
                return "tool_use", None
            if stop_string is not None:
                return "stop_sequence", stop_string
            return ("max_tokens" if finish == "length" else "end_turn"), None

        def tool_block(call) -> dict[str, Any]:
            return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
                    "input": json.loads(call.arguments)}

        if body.stream:
            return StreamingResponse(_events(server, stream, head, len(prompt), calling, stop_reason, tool_block),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        text, generated, finish, stop_string, cached = "", 0, None, None, 0
        async for piece in stream:
            text += piece.text
            generated += len(piece.tokens)
            if piece.finish_reason:
                finish, stop_string, cached = piece.finish_reason, piece.stop_string, piece.cached_tokens

        def build() -> dict[str, Any]:
            content, calls = calling.split(text) if calling is not None else (text, [])
            reason, sequence = stop_reason(finish, stop_string, calls)
            blocks = ([{"type": "text", "text": content}] if content or not calls else []) + [tool_block(c) for c in calls]
            return {**head, "content": blocks, "stop_reason": reason, "stop_sequence": sequence,
                    "usage": _usage(len(prompt), cached, generated)}
        return await json_response(server, build)

    return api


def _usage(prompt_tokens: int, cached: int, generated: int) -> dict[str, int]:
    """Anthropic's usage: the prompt tokens read from the cache (the KV cache's reused prefix, in memory or
    from --prompt-cache) counted apart from the ones computed, as its prompt caching counts them."""
    return {"input_tokens": prompt_tokens - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": generated}


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


async def _events(server, stream, head, input_tokens, calling, stop_reason, tool_block):
    """Anthropic's stream: message_start, then each content block as start, deltas and stop, then
    message_delta (stop reason, usage) and message_stop; an error mid-stream is an `error` event."""
    yield _event("message_start", {"message": {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})
    split = calling.stream() if calling is not None else None
    index, text_open, generated = 0, False, 0
    try:
        async for piece in stream:
            generated += len(piece.tokens)
            text, calls = shown(split, piece)
            if text:
                if not text_open:
                    yield _event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                    text_open = True
                yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": text}})
            if not piece.finish_reason:
                continue
            if text_open:
                yield _event("content_block_stop", {"index": index})
                index += 1
            for call in calls:  # each call a block: its id and name, then its input as JSON
                block = tool_block(call)
                yield _event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                yield _event("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
                yield _event("content_block_stop", {"index": index})
                index += 1
            reason, sequence = stop_reason(piece.finish_reason, piece.stop_string, calls)
            yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                           "usage": _usage(input_tokens, piece.cached_tokens, generated)})
            yield _event("message_stop", {})
            return
    except APIError as e:  # the headers are gone: the error travels as an event, as Anthropic's does
        yield _event("error", {"error": {"type": "overloaded_error" if e.status == 503 else "api_error",
                                         "message": clip(e.message, 500)}})
    finally:
        await stream.aclose()
