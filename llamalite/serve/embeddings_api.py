"""OpenAI's embeddings API: POST /v1/embeddings, pooled last hidden states (see llamalite.generation.embed), computed
on the engine's thread between decode steps."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ..generation.embed import embed_ids
from .core import json_response
from .protocol import APIError, Text, TokenId
from .engine import EngineClosed
from .hub import Hub

MAX_INPUTS = 2048  # as OpenAI


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | \
        Annotated[list[TokenId], Field(min_length=1)] | \
        Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own width: no other can be honoured")
    user: Text | None = Field(None, description="accepted; changes nothing")


def router(hub: Hub) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        server = await hub.get(body.model)
        dim = server.lm.config.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(400, f"this model's embeddings have {dim} dimensions and cannot be shortened to "
                                f"{body.dimensions}; leave dimensions out or give {dim}", param="dimensions")
        raw = body.input
        inputs = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else list(raw)

        def tokenize() -> list[list[int]]:
            ids = []
            for k, x in enumerate(inputs):
                tokens = server.prompt_ids(x, "input")
                if len(tokens) > server.engine.max_seq_len:
                    raise APIError(400, f"input {k} is {len(tokens)} tokens but the context is "
                                        f"{server.engine.max_seq_len}; shorten it", param="input",
                                   code="context_length_exceeded")
                ids.append(tokens)
            return ids
        ids = await server.offload(tokenize)
        try:
            vectors = await asyncio.wrap_future(server.engine.call(lambda: _embed(server, ids)))
        except EngineClosed as e:  # the server stopping, or the model unloaded for another meanwhile
            raise APIError(503, f"{e}; retry", type="server_error", headers={"Retry-After": "1"}) from None

        def build() -> dict[str, Any]:
            def encode(v) -> Any:
                if body.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
                    return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                return v.tolist()
            n = sum(len(t) for t in ids)
            return {"object": "list", "model": server.model_name,
                    "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
                    "usage": {"prompt_tokens": n, "total_tokens": n}}
        return await json_response(server, build)

    return api


def _embed(server, ids: list[list[int]]):
    """The inputs' embeddings on the engine's thread, through the request's LoRA adapter if it has one."""
    adapters = getattr(server.lm.model, "adapters", None)
    if adapters is None or server.adapter is None:
        return embed_ids(server.lm.model, ids, server.pooling)
    with adapters.use([server.adapter] * len(ids)):
        return embed_ids(server.lm.model, ids, server.pooling)
