"""The `/v1/responses` route: a Responses request (responses_api.py) run as the chat request it
stands for through the core, answered as a `response` object or its event stream
(responses_stream.py). Errors before the first token keep their HTTP status (OpenAI error body);
a client that goes away aborts the request (logged as 499)."""
from __future__ import annotations

import asyncio
import uuid
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from baton.router.gateway.auth import caller_owner
from baton.router.gateway.convert import check_model, prepare_chat
from baton.router.gateway.logprobs import TokenStrings
from baton.router.gateway.errors import CLIENT_CLOSED_STATUS
from baton.router.gateway.relay import DisconnectWatcher, first_chunk
from baton.router.gateway.responses import Collector, ResponseContext
from baton.router.gateway.responses_api import ResponseShell, ResponsesRequest, response_from_completion, to_chat
from baton.router.gateway.responses_stream import ResponseEvents, response_events
from baton.router.gateway.tool_parsers import ToolParser
from baton.router.gateway.tools import ToolChatStream, plan_tools
from baton.router.stream import StreamClosed
from baton.router.types import RouterCoreAPI, RouterRequest


def responses_routes(core: RouterCoreAPI, dependencies: list, strings: TokenStrings,
                     parser: Optional[ToolParser]) -> APIRouter:
    """The /v1/responses route, behind `dependencies` (the API keys)."""
    v1 = APIRouter(prefix="/v1", dependencies=dependencies)

    @v1.post("/responses")
    async def create_response(request: Request) -> Response:
        body = ResponsesRequest.model_validate_json(await request.body())
        check_model(body.model, core.model_name)
        chat = to_chat(body)
        plan = plan_tools(chat.tools, chat.tool_choice, chat.parallel_tool_calls, parser)
        prepared = await asyncio.to_thread(prepare_chat, chat, core.tokenizer, core.max_model_len, plan)
        request_id = f"resp-{uuid.uuid4().hex}"
        ctx = ResponseContext(request_id=request_id, model=core.model_name,
                              prompt_tokens=len(prepared.prompt_token_ids), strings=strings)
        shell = ResponseShell(body, core.model_name, plan)
        stream = core.open_stream(RouterRequest(
            request_id=request_id, prompt_token_ids=prepared.prompt_token_ids, params=prepared.params,
            timeout_s=core.config.request_timeout_s, owner=caller_owner(request)))
        watcher = DisconnectWatcher(stream, request.receive)
        if body.stream:
            if (first := await first_chunk(stream, watcher)) is None:
                return Response(status_code=CLIENT_CLOSED_STATUS)
            events = ResponseEvents(shell, ToolChatStream(ctx, plan))
            return StreamingResponse(response_events(stream, first, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collector = Collector(ctx)
        try:
            while (chunk := await stream.next()) is not None:
                collector.add(chunk)
        except StreamClosed:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        finally:
            watcher.stop()
            stream.close()
        completion = plan.finish_completion(collector.chat_completion())
        return JSONResponse(response_from_completion(shell, completion))

    return v1
