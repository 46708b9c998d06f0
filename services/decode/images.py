"""What a decode worker does for a request with images (docs/vision.md).

- `expand`: each image's placeholder in the prompt becomes one token per embedding (the
  folder's image processor, no tower); the images come back with offsets, counts and grids.
- Decode-only path (`add_request`): the embeddings come from an encoder (or, with none
  configured, this worker's own tower), then the request joins the engine with its spans.
- Disaggregated path: the reservation keys its prefix cache by the images' hashes
  (`spans`), prefill gets the expanded images and the encoder list, and meanwhile this worker
  takes its own copy of the embeddings (`start_fetch` / `finish_fetch`) so a preemption,
  which recomputes the prompt here, finds them.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional, Sequence

from baton.protos.baton.v1 import worker_pb2
from baton.protos.errors import BatonError, ErrorCode
from baton.services.engine.multimodal.inputs import ImageSpan


def _images(runtime):
    if runtime.images is None:
        raise BatonError(ErrorCode.INVALID_REQUEST, "this model takes no images")
    return runtime.images


def _deadline(runtime, deadline: Optional[float]) -> float:
    return deadline if deadline is not None else time.monotonic() + runtime.config.prefill_timeout_s


async def expand(runtime, prompt: list[int], request) -> tuple[list[int], list[worker_pb2.ImageInput]]:
    """(expanded prompt, expanded images); the prompt unchanged and [] for a text request."""
    if not request.images:
        return prompt, []
    images = _images(runtime)
    try:
        return await asyncio.to_thread(images.expand, prompt, list(request.images))
    except ValueError as error:
        raise BatonError(ErrorCode.INVALID_REQUEST, str(error)) from None


async def add_request(runtime, rid: str, prompt: list[int], params, images: Sequence[worker_pb2.ImageInput],
                      request, deadline: Optional[float], resume) -> None:
    """The decode-only path of a request with images."""
    helper = _images(runtime)
    try:
        embeddings = await helper.embeddings(rid, images, list(request.encoder_addresses),
                                             _deadline(runtime, deadline))
    except ValueError as error:
        raise BatonError(ErrorCode.INVALID_REQUEST, str(error)) from None
    spans = helper.spans(images, embeddings)
    try:
        await runtime.thread.call(lambda e: e.add_image_request(rid, prompt, params, spans, resume=resume))
    except ValueError as error:
        raise BatonError(ErrorCode.INVALID_REQUEST, str(error)) from None


def spans(runtime, images: Sequence[worker_pb2.ImageInput]) -> list[ImageSpan]:
    """The reservation's spans (embeddings filled in later by `finish_fetch`); [] for text."""
    return _images(runtime).spans(images) if images else []


def start_fetch(runtime, rid: str, images: Sequence[worker_pb2.ImageInput], request,
                deadline: Optional[float]) -> Optional[asyncio.Task]:
    """Begin taking this worker's copy of the embeddings (None for a text request)."""
    if not images:
        return None
    return asyncio.get_running_loop().create_task(
        _images(runtime).embeddings(f"{rid}/decode", images, list(request.encoder_addresses),
                                    _deadline(runtime, deadline)))


async def finish_fetch(task: Optional[asyncio.Task], reserved: Sequence[ImageSpan]) -> None:
    """Wait for `start_fetch`'s embeddings and attach them to the reservation's spans."""
    if task is None:
        return
    for span, embeddings in zip(reserved, await task):
        span.embeddings = embeddings


def cancel_fetch(task: Optional[asyncio.Task]) -> None:
    """Stop a fetch whose request failed."""
    if task is not None and not task.done():
        task.cancel()
