"""What a prefill worker does for a request with images: take their embeddings, then add the request.

The images arrive expanded from decode (offsets, counts, grids, bytes). Their embeddings
come from the first encoder that delivers them into this worker's landing arena
(`services/worker/images.py`), or from this worker's own tower when no encoder is
configured (the colocated baseline); then the prompt joins the engine with its spans.
"""
from __future__ import annotations

from baton.protos.errors import BatonError, ErrorCode


async def add_request(runtime, rid: str, request, params, deadline: float) -> None:
    """Queue the prompt of `request` (a PrefillRequest) as a held one-token request."""
    prompt = list(request.prompt_token_ids)
    if not request.images:
        await runtime.thread.call(lambda e: e.add_request(rid, prompt, params, hold_blocks=True))
        return
    if runtime.images is None:
        raise BatonError(ErrorCode.INVALID_REQUEST, "this model takes no images")
    images = list(request.images)
    embeddings = await runtime.images.embeddings(rid, images, list(request.encoder_addresses), deadline)
    spans = runtime.images.spans(images, embeddings)
    await runtime.thread.call(lambda e: e.add_image_request(rid, prompt, params, spans, hold_blocks=True))
