"""The streamed Responses API (`/v1/responses` with `stream: true`): its SSE events.

`ResponseEvents` turns the chat chunks a `ChatStream` / `ToolChatStream` makes (tools.py:
content held back while a tool call may begin, then `delta.tool_calls`) into OpenAI's event
sequence, each `event: <type>` + `data: {...}` with a growing `sequence_number`:
`response.created`, `response.in_progress`; for text `response.output_item.added` (a
`message`), `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`; for
each tool call `response.output_item.added` (a `function_call`),
`response.function_call_arguments.delta`..., `response.function_call_arguments.done`,
`response.output_item.done`; and last `response.completed` (or `response.incomplete` when
`max_output_tokens` cut it) with the whole response, equal to the non-streamed one but for ids.
An error mid-stream is one `error` event, then `response.failed` is not sent: the stream ends.
"""
from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Optional

from baton.protos.errors import BatonError
from baton.router.gateway.errors import as_api_error
from baton.router.gateway.responses import ChatStream
from baton.router.gateway.sse import compact_json
from baton.router.gateway.responses_api import (ResponseShell, function_call_item, message_item, new_id,
                                                status_of, text_part, usage_of)
from baton.router.stream import StreamClosed
from baton.router.types import Chunk, ChunkStream

log = logging.getLogger(__name__)


def event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {compact_json(data)}\n\n"


class _Call:
    def __init__(self, output_index: int, call_id: str, name: str) -> None:
        self.item_id = new_id("fc")
        self.output_index, self.call_id, self.name = output_index, call_id, name
        self.arguments = ""


class ResponseEvents:
    """The events of one streamed response (see the module doc)."""

    def __init__(self, shell: ResponseShell, chat: ChatStream) -> None:
        self.shell, self.chat = shell, chat
        self._seq = 0
        self._output: list[dict[str, Any]] = []
        self._message_id: Optional[str] = None
        self._message_index = -1
        self._text = ""
        self._calls: dict[int, _Call] = {}
        self._finish: Optional[str] = None

    def _event(self, kind: str, **data: Any) -> str:
        data = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return event(kind, data)

    def start(self) -> list[str]:
        obj = self.shell.object("in_progress", [])
        return [self._event("response.created", response=obj), self._event("response.in_progress", response=obj)]

    def _open_message(self) -> list[str]:
        self._message_id = new_id("msg")
        self._message_index = len(self._output)
        self._output.append(message_item(self._message_id, "", status="in_progress"))
        ids = dict(item_id=self._message_id, output_index=self._message_index, content_index=0)
        return [self._event("response.output_item.added", output_index=self._message_index,
                            item=message_item(self._message_id, "", status="in_progress")),
                self._event("response.content_part.added", **ids, part=text_part(""))]

    def _close_message(self) -> list[str]:
        if self._message_id is None:
            return []
        ids = dict(item_id=self._message_id, output_index=self._message_index, content_index=0)
        item = message_item(self._message_id, self._text)
        self._output[self._message_index] = item
        out = [self._event("response.output_text.done", **ids, text=self._text, logprobs=[]),
               self._event("response.content_part.done", **ids, part=text_part(self._text)),
               self._event("response.output_item.done", output_index=self._message_index, item=item)]
        self._message_id = None
        return out

    def _tool_delta(self, delta: dict[str, Any]) -> list[str]:
        out: list[str] = []
        index = delta.get("index", 0)
        function = delta.get("function") or {}
        call = self._calls.get(index)
        if call is None:
            out += self._close_message()
            call = self._calls[index] = _Call(len(self._output), delta.get("id") or new_id("call"),
                                              function.get("name") or "")
            self._output.append(function_call_item(call.item_id, call.call_id, call.name, "", status="in_progress"))
            out.append(self._event("response.output_item.added", output_index=call.output_index,
                                   item=function_call_item(call.item_id, call.call_id, call.name, "",
                                                           status="in_progress")))
        piece = function.get("arguments") or ""
        if piece:
            call.arguments += piece
            out.append(self._event("response.function_call_arguments.delta", item_id=call.item_id,
                                   output_index=call.output_index, delta=piece))
        return out

    def chunk(self, chunk: Chunk) -> list[str]:
        obj = self.chat.chunk(chunk)
        if obj is None:
            return []
        out: list[str] = []
        for choice in obj["choices"]:
            delta = choice["delta"]
            text = delta.get("content")
            if text:
                if self._message_id is None and not self._calls:
                    out += self._open_message()
                if self._message_id is not None:
                    self._text += text
                    out.append(self._event("response.output_text.delta", item_id=self._message_id,
                                           output_index=self._message_index, content_index=0, delta=text,
                                           logprobs=[]))
            for call_delta in delta.get("tool_calls") or []:
                out += self._tool_delta(call_delta)
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
        return out

    def finish(self) -> list[str]:
        out = []
        if self._message_id is None and not self._calls and not self._output:
            out += self._open_message()  # an empty answer is still one (empty) message
        out += self._close_message()
        for call in self._calls.values():
            item = function_call_item(call.item_id, call.call_id, call.name, call.arguments)
            self._output[call.output_index] = item
            out.append(self._event("response.function_call_arguments.done", item_id=call.item_id,
                                   output_index=call.output_index, name=call.name, arguments=call.arguments))
            out.append(self._event("response.output_item.done", output_index=call.output_index, item=item))
        status, incomplete = status_of(self._finish)
        usage = usage_of(self.chat.usage.as_dict())
        final = self.shell.object(status, self._output, usage, incomplete)
        out.append(self._event("response.completed" if status == "completed" else "response.incomplete",
                               response=final))
        return out


async def response_events(stream: ChunkStream, first: Optional[Chunk], events: ResponseEvents) -> AsyncIterator[str]:
    """The SSE body of a streamed response, from an already received first chunk."""
    try:
        for item in events.start():
            yield item
        chunk = first
        while chunk is not None:
            for item in events.chunk(chunk):
                yield item
            chunk = await stream.next()
        for item in events.finish():
            yield item
    except StreamClosed:
        return
    except Exception as e:
        error = as_api_error(e)
        if error.status >= 500 and not isinstance(e, BatonError):
            log.exception("streaming response %s failed", stream.request_id)
        body = error.body()["error"]
        yield events._event("error", code=body["code"], message=body["message"], param=body["param"])
    finally:
        stream.close()
