"""`llamalite serve`: an HTTP server over the batching engine (FastAPI + uvicorn + pydantic), with a
chat page at `/`.

Layout: `engine` (continuous batching; every model's engine on one runner thread), `core` (the Server
object of one model over its engine, errors, the stream of pieces each choice produces, SSE), `hub`
(the models of a server by name: routing, loading on first use, LRU unloading, LoRA adapters as
views), one module per API family with its request models beside its routes (`openai_api`: models,
completions, chat completions, tokenize; `responses_api`; `embeddings_api`; `anthropic_api`),
`calling` (grammars and tool calling, shared by the families), `guard` (what reaches the app), `app`
(the wiring, the page, health, metrics, error handlers) and `http` (uvicorn). Errors come back in the
family's shape (OpenAI's {"error": {"message", "type", "param", "code"}}, or Anthropic's), with the
status a client expects; a request never takes the server down.
"""

from .app import create_app
from .core import Server
from .protocol import APIError
from .http import BackgroundServer, serve, wait_until_serving
from .hub import Hub

__all__ = ["APIError", "BackgroundServer", "Hub", "Server", "create_app", "serve", "wait_until_serving"]
