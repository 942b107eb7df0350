"""OpenAI's API family: /v1/models, /v1/completions, /v1/chat/completions, and the tokenizer routes
that its clients (llama.cpp's and vLLM's names, lm-eval's remote tokenizer) use beside it. The
pydantic request models sit beside their routes."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..generation.constrain import Grammar
from ..generation.sampling import SamplingParams
from .core import Server, chat_logprobs, completion_logprobs, json_response, streaming_response
from .protocol import MAX_STOP, APIError, JSONSchemaFormat, Strict, Text, TokenId
from .streaming import Piece, choices_usage, collect, merge, usage_of
from .calling import check_strict, compile_grammar, encode_conversation, tool_setup
from .engine import TokenEvent
from .guard import clip
from .hub import Hub


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class SpeculativeOptions(Strict):
    n_max: int | None = Field(None, ge=0, le=7, description="tokens drafted a pass at most (0: no drafts)")
    n_min: int | None = Field(None, ge=0, le=7, description="no pass over a draft shorter than this")
    p_min: float | None = Field(None, ge=0, le=1, description="a draft model's top probability to go on drafting")


class _Sampling(Strict):
    """Fields shared by both generation endpoints. A field this server does not know is refused with a
    400 naming it: one that would change the output is honoured or refused, never dropped. The last
    group changes nothing here and is accepted."""

    model: Text
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1_000_000, description="llamalite extension: 0 turns it off")
    min_p: float = Field(0.0, ge=0, le=1, description="llamalite extension: 0 turns it off")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, description="llamalite extension: 1 turns it off")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> added to its logit; -100 bans it, 100 all but forces it")
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    response_format: ResponseFormat | None = None
    grammar: Text | None = Field(None, description="llama.cpp extension: a GBNF grammar the output matches")
    json_schema: dict[str, Any] | None = Field(None, description="llama.cpp extension: a JSON Schema the output matches")
    user: Text | None = Field(None, description="accepted; changes nothing")
    metadata: dict[Text, Text] | None = Field(None, description="accepted; changes nothing")
    store: bool | None = Field(None, description="accepted; nothing is stored")
    service_tier: Text | None = Field(None, description="accepted; changes nothing")
    prompt_cache_key: Text | None = Field(None, description="accepted; the KV cache is reused by prefix anyway")
    safety_identifier: Text | None = Field(None, description="accepted; changes nothing")
    cache_prompt: bool | None = Field(None, description="llama.cpp's; accepted, the prefix is always reused")
    speculative: SpeculativeOptions | None = Field(
        None, description="llama.cpp extension: this request's speculative decoding on a server started with "
                          "--draft-model or --lookup (also as flat keys, speculative.n_max and so on)")
    speculative_n_max: int | None = Field(None, alias="speculative.n_max", ge=0, le=7)
    speculative_n_min: int | None = Field(None, alias="speculative.n_min", ge=0, le=7)
    speculative_p_min: float | None = Field(None, alias="speculative.p_min", ge=0, le=1)

    def sampling(self) -> SamplingParams:
        bias = tuple((int(k), v) for k, v in (self.logit_bias or {}).items())
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logit_bias=bias)

    def speculative_settings(self) -> dict[str, Any] | None:
        """The speculative settings asked for, nested or as llama.cpp's flat keys, or None."""
        nested = self.speculative.model_dump(exclude_none=True) if self.speculative is not None else {}
        flat = {k: getattr(self, f"speculative_{k}") for k in ("n_max", "n_min", "p_min")
                if getattr(self, f"speculative_{k}") is not None}
        both = sorted(set(nested) & set(flat))
        if both:
            raise APIError(400, f"speculative.{both[0]} is given twice (nested and flat): give it once",
                           param="speculative")
        return {**nested, **flat} or None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check(self, server: Server) -> None:
        """What the field types cannot say: logit_bias's ids (digits, by the field's pattern) against the
        vocabulary; speculative settings against the server's drafting."""
        server.check_speculative(self.speculative_settings())
        for key in self.logit_bias or {}:
            if int(key) >= server.tokenizer.vocab_size:
                raise APIError(400, f"logit_bias key '{clip(key, 20)}' is not a token id of this model (0 to "
                                    f"{server.tokenizer.vocab_size - 1})", param="logit_bias")

    def grammar_spec(self) -> tuple[str, Any, str] | None:
        """The one constraint asked for, as (kind, source, the field that asked), or None."""
        asked = []
        if self.response_format is not None and self.response_format.type != "text":
            if self.response_format.type == "json_object":
                asked.append(("json_schema", {"type": "object"}, "response_format"))
            elif self.response_format.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs its json_schema: {\"name\": ..., "
                                    "\"schema\": {...}}", param="response_format")
            else:
                fmt = self.response_format.json_schema
                if fmt.strict:
                    check_strict(f"response_format '{clip(fmt.name, 64)}'", fmt.schema_, "response_format")
                asked.append(("json_schema", fmt.schema_, "response_format"))
        if self.json_schema is not None:
            asked.append(("json_schema", self.json_schema, "json_schema"))
        if self.grammar is not None:
            asked.append(("gbnf", self.grammar, "grammar"))
        if len(asked) > 1:
            raise APIError(400, f"give one of {', '.join(a[2] for a in asked)}, not several", param=asked[1][2])
        return asked[0] if asked else None


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(Strict):
    name: Text
    arguments: Text = Field(description="the arguments as a JSON object, in text")


class ToolCallItem(Strict):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = Field(None, description="passed to the chat template, which may show it")
    tool_calls: list[ToolCallItem] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: Text | None = Field(None, description="a tool turn's call")
    refusal: Text | None = Field(None, description="accepted on assistant turns; not shown to the model")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class FunctionSpec(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema for the arguments")
    strict: bool | None = Field(None, description="true: the parameters must be a strict schema (closed objects, every "
                                                  "key required), else a 400; a required call is constrained to them")


class ToolSpec(Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Strict):
    name: Text


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="more than one call in a reply (default true)")


class TokenizeRequest(BaseModel):
    """llama.cpp's fields (content, add_special) or vLLM's (prompt, add_special_tokens): lm-eval's remote
    tokenizer speaks the latter."""
    model_config = ConfigDict(extra="allow")

    model: Text | None = Field(None, description="whose tokenizer (default: the first model served)")
    content: Text | None = Field(None, description="text to tokenize")
    prompt: Text | None = Field(None, description="the same, under vLLM's name")
    add_special: bool | None = Field(None, description="add the BOS token where the model uses one (default true)")
    add_special_tokens: bool | None = Field(None, description="the same, under vLLM's name")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text | None = Field(None, description="whose tokenizer (default: the first model served)")
    tokens: list[TokenId]


# ----- routes ------------------------------------------------------------------------------------------

def router(hub: Hub) -> APIRouter:
    """The routes of this family over the models of `hub` (the API key is checked before them, in
    guard.Guard)."""
    api = APIRouter()

    def anthropic_card(card: dict[str, Any]) -> dict[str, Any]:
        created = datetime.fromtimestamp(card["created"], timezone.utc).isoformat().replace("+00:00", "Z")
        return {"type": "model", "id": card["id"], "display_name": card["id"], "created_at": created,
                "max_input_tokens": card["context_length"]}

    @api.get("/v1/models")
    async def models(http: Request) -> dict[str, Any]:
        """Every model served: in OpenAI's list, or in Anthropic's for its clients (which send anthropic-version)."""
        if "anthropic-version" in http.headers:
            data = [anthropic_card(c) for c in hub.cards()]
            return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        return {"object": "list", "data": hub.cards()}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str, http: Request) -> dict[str, Any]:
        """One model's card (the `openai` client's models.retrieve, or the `anthropic` client's)."""
        hub.check_name(model_id)
        card = hub.cards()[hub.names.index(model_id)]
        return anthropic_card(card) if "anthropic-version" in http.headers else card

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        server = await hub.get(body.model or hub.names[0])
        text = body.content if body.content is not None else body.prompt
        if text is None:
            raise APIError(400, "give the text to tokenize as content (or prompt)", param="content")
        special = next((v for v in (body.add_special, body.add_special_tokens) if v is not None), True)
        tokens = await server.offload(server.tokenizer.encode, text, None if special else False)
        return await json_response(server, lambda: {"tokens": tokens, "count": len(tokens),
                                            "max_model_len": server.engine.max_seq_len})

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        server = await hub.get(body.model or hub.names[0])
        text = await server.offload(server.tokenizer.decode, server.check_ids(body.tokens, "tokens"))
        return {"content": text, "prompt": text}  # llama.cpp's name and vLLM's

    @api.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
        """What a client needs to tokenize as the server does (vLLM's endpoint; lm-eval reads it)."""
        server = await hub.get(model or hub.names[0])
        tok = server.tokenizer
        return {"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token if tok.bos_id is not None else None,
                "eos_token": tok.eos_token if tok.eos_id is not None else None, "pad_token": None,
                "add_bos_token": tok.add_bos, "chat_template": server.lm.chat_template,
                "model_max_length": server.engine.max_seq_len}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        server = await hub.get(body.model)
        # The prompt's own log-probabilities (what lm-eval's loglikelihood reads), or an echo of nothing but it.
        score = body.echo and (body.logprobs is not None or body.max_tokens == 0)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is only for echo: scoring the prompt)",
                           param="max_tokens")
        raw = body.prompt
        prompts = ([raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)) or [""]
        n = body.n
        body.check(server)
        server.check_choices(len(prompts) * n, "n" if n > 1 else "prompt")
        stop = server.check_stop(body.stop_strings())
        spec = body.grammar_spec()

        def prepare():
            ids = [server.prompt_ids(p) for p in prompts]
            if score:  # every prompt token with its top alternatives, for every choice: bound the response
                entries = sum(len(p) for p in ids) * n * (1 + (body.logprobs or 0))
                if entries > server.limits.max_scored_entries:
                    raise APIError(400, f"scoring these prompts would return {entries} log-probabilities (prompt "
                                        f"tokens x n x (1 + logprobs)); the most is "
                                        f"{server.limits.max_scored_entries}: send fewer or shorter prompts, "
                                        f"or lower logprobs or n", param="logprobs")
            texts = [p if isinstance(p, str) else server.tokenizer.decode(p) for p in prompts]
            return ids, texts, compile_grammar(server, spec)
        ids, texts, grammar = await server.offload(prepare)
        budgets = [server.budget(len(p), body.max_tokens) for p in ids]
        stream = merge([server.run(i * n + j, p, b, body.sampling(), body.seed, body.logprobs, stop, score, grammar,
                                    body.speculative_settings())
                         for i, (p, b) in enumerate(zip(ids, budgets)) for j in range(n)])
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        offsets = {}

        def choice_logprobs(index: int, tokens: list[TokenEvent]):
            if body.logprobs is None:
                return None
            out = completion_logprobs(server, tokens, offsets.get(index, 0))
            if out["text_offset"]:
                offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
            return out

        if body.stream:
            usage_counts = {"completion": 0, "cached": 0}
            echoed: set[int] = set()

            def chunk(piece: Piece):
                usage_counts["completion"] += len(piece.tokens)
                usage_counts["cached"] += piece.cached_tokens if piece.finish_reason else 0
                text, tokens = piece.text, piece.tokens
                if body.echo and piece.index not in echoed and (piece.prompt_logprobs is not None or not score):
                    echoed.add(piece.index)
                    text = texts[piece.index // n] + text
                    tokens = (piece.prompt_logprobs or []) + tokens
                if not text and not tokens and not piece.finish_reason:
                    return
                yield {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                       "choices": [{"index": piece.index, "text": text,
                                    "logprobs": choice_logprobs(piece.index, tokens),
                                    "finish_reason": piece.finish_reason}]}

            def final():
                if body.stream_options and body.stream_options.include_usage:
                    yield {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                           "choices": [], "usage": usage_of(sum(len(x) for x in ids) * n, usage_counts["completion"],
                                                               usage_counts["cached"])}
            return streaming_response(server, stream, chunk, final)

        choices = await collect(stream, len(ids) * n)
        return await json_response(server, lambda: {
            "id": rid, "object": "text_completion", "created": created, "model": server.model_name,
            "choices": [{"index": c.index, "text": (texts[c.index // n] if body.echo else "") + c.text,
                         "logprobs": choice_logprobs(c.index, (c.prompt_logprobs or []) + c.tokens),
                         "finish_reason": c.finish_reason}
                        for c in choices],
            "usage": choices_usage(ids, n, choices)})

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        server = await hub.get(body.model)
        stop, n = server.check_stop(body.stop_strings()), body.n
        body.check(server)
        server.check_choices(n, "n")
        spec = body.grammar_spec()
        messages = [m.for_template() for m in body.messages]
        server.check_text("".join(m["content"] for m in messages), "messages")
        choice = body.tool_choice or ("auto" if body.tools else "none")
        calling = tool_setup(server, [t.model_dump(exclude_none=True) for t in body.tools or []],
                             "named" if isinstance(choice, NamedToolChoice) else choice,
                             choice.function.name if isinstance(choice, NamedToolChoice) else None,
                             body.parallel_tool_calls is not False,
                             any(m.tool_calls or m.role == "tool" for m in body.messages), spec)

        def prepare() -> tuple[list[int], Grammar | None]:
            ids = encode_conversation(server, messages, calling)
            if calling is not None and calling.required:
                return ids, calling.grammar(server)
            return ids, compile_grammar(server, spec)
        prompt, grammar = await server.offload(prepare)
        if not prompt:
            raise APIError(400, "the rendered conversation is empty", param="messages")
        budget = server.budget(len(prompt), body.max_completion_tokens or body.max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        stream = merge([server.run(j, prompt, budget, body.sampling(), body.seed, logprobs, stop, grammar=grammar,
                                    speculative=body.speculative_settings(),
                                    stop_when=calling.stop_when() if calling is not None else None)
                         for j in range(n)])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name}

        if body.stream:
            usage_counts = {"completion": 0, "cached": 0}

            roles: set[int] = set()
            streams = {j: calling.stream() for j in range(n)} if calling is not None else {}

            def chunk(piece: Piece):
                usage_counts["completion"] += len(piece.tokens)
                usage_counts["cached"] += piece.cached_tokens if piece.finish_reason else 0
                if piece.index not in roles:  # each choice opens with its role, as OpenAI's streams do
                    roles.add(piece.index)
                    yield {**head, "choices": [{"index": piece.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]}
                split = streams.get(piece.index)
                text = piece.text if split is None else split.push(piece.text)
                if text or piece.tokens and (split is None or body.logprobs):  # held-back calls send nothing yet
                    yield {**head, "choices": [{"index": piece.index, "delta": {"content": text},
                                                "logprobs": chat_logprobs(server, piece.tokens) if body.logprobs else None,
                                                "finish_reason": None}]}
                finish = piece.finish_reason
                if finish and split is not None:
                    rest, calls = split.finish()
                    if rest:
                        yield {**head, "choices": [{"index": piece.index, "delta": {"content": rest}, "logprobs": None,
                                                    "finish_reason": None}]}
                    for k, call in enumerate(calls):  # as OpenAI streams them: id and name, then the arguments
                        yield {**head, "choices": [{"index": piece.index, "logprobs": None, "finish_reason": None,
                                                    "delta": {"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                                                              "function": {"name": call.name,
                                                                                           "arguments": ""}}]}}]}
                        yield {**head, "choices": [{"index": piece.index, "logprobs": None, "finish_reason": None,
                                                    "delta": {"tool_calls": [{"index": k, "function": {
                                                        "arguments": call.arguments}}]}}]}
                    finish = "tool_calls" if calls and finish == "stop" else finish
                if finish:
                    yield {**head, "choices": [{"index": piece.index, "delta": {}, "logprobs": None,
                                                "finish_reason": finish}]}

            def final():
                if body.stream_options and body.stream_options.include_usage:
                    yield {**head, "choices": [], "usage": usage_of(len(prompt) * n, usage_counts["completion"],
                                                                      usage_counts["cached"])}

            return streaming_response(server, stream, chunk, final)

        choices = await collect(stream, n)

        def message(c) -> tuple[dict[str, Any], str | None]:
            if calling is None:
                return {"role": "assistant", "content": c.text}, c.finish_reason
            content, calls = calling.split(c.text)
            if not calls:
                return {"role": "assistant", "content": content}, c.finish_reason
            return ({"role": "assistant", "content": content or None, "tool_calls": [
                {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                for t in calls]}, "tool_calls" if c.finish_reason == "stop" else c.finish_reason)

        def build():
            out = []
            for c in choices:
                msg, finish = message(c)
                out.append({"index": c.index, "message": msg, "finish_reason": finish,
                            "logprobs": chat_logprobs(server, c.tokens) if body.logprobs else None})
            return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                    "choices": out, "usage": choices_usage([prompt], n, choices)}
        return await json_response(server, build)

    return api
