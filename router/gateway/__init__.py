"""The OpenAI-compatible HTTP gateway of the router (FastAPI + uvicorn).

- `protocol`: request bodies; `convert`: bodies -> prompt ids + wire SamplingParams;
  `responses` / `logprobs`: OpenAI response objects and stream chunks;
  `errors`: the OpenAI error body and status mapping; `relay`: core -> client streaming,
  disconnect and abort; `sse`: server-sent event framing (compact JSON); `app`: `create_app(core)`; `server`: `serve_gateway(core, host, port)`;
  `dashboard`: the live HTML page; `extensions` / `select`: the routes beyond the OpenAI API;
  `auth`: API / admin key dependencies, the cancel route, the self-contained /docs.
"""
from baton.router.gateway.app import create_app
from baton.router.gateway.server import GatewayServer, serve_gateway

__all__ = ["create_app", "serve_gateway", "GatewayServer"]
