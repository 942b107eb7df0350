"""`llamalite serve`: an HTTP server over the batching engine (FastAPI + uvicorn + pydantic), with a
chat page at `/`.

Layout: `engine` (continuous batching), `core` (the Server object over the engine, errors, the stream
of pieces each choice produces, SSE), one module per API family with its request models beside its
routes (`openai_api`: models, completions, chat completions, tokenize), `app` (the wiring, the page,
health, metrics, error handlers) and `http` (uvicorn). Errors come back in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with the status a client expects; a request never
takes the server down.
"""

from .app import create_app
from .core import APIError, Server
from .http import BackgroundServer, serve, wait_until_serving

__all__ = ["APIError", "BackgroundServer", "Server", "create_app", "serve", "wait_until_serving"]
