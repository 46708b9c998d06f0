"""A worker's image inputs: placeholder expansion, and embeddings from encoders or its own tower.

Owns, for a prefill or decode worker serving a vision-language model:
- `expand`: a request's images (bytes from the router) preprocessed by the folder's image
  processor (no tower), each placeholder of the prompt expanded to the image's embedding
  count; the result is the expanded prompt and the images with offsets, counts and grids
  (what decode hands prefill, and what the spans of the prefix-cache key are made of);
- `embeddings`: the images' embeddings. With encoders configured (`encoder_addresses`, the
  router's order of preference) it asks one to write them into this worker's landing arena
  (`EmbeddingArena`, a transfer engine of its own) and reads them out; a failing encoder
  (unreachable, erroring, a transfer that does not land) is retried on the next, and none
  left is NO_WORKER naming each failure. It never runs the tower then. Without encoders
  (the colocated baseline) it runs the folder's tower itself, off the engine thread.

Late writes. Each fetch attempt has its own rendezvous id (`rid/images/<nonce>`), and an
attempt that ends without its embeddings (encoder error, deadline, cancellation) must not
let the encoder's write land in blocks already handed to another request. The tcp receiver
refuses a fenced id (`TransferEngine.forget`, called before the blocks are freed), so its
blocks go back at once. A one-sided backend (nixl) writes without the receiver's say: there
the blocks of a failed attempt stay out of the free list (quarantined) until the encoder's
deadline for that attempt, plus `late_write_grace_s`, has passed (the encoder starts no
write after its deadline).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Optional, Sequence

import grpc
import torch
from prometheus_client import Counter

from baton.protos.baton.v1 import kv_pb2, worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import open_channel
from baton.protos.errors import BatonError, ErrorCode, ErrorOrigin, error_from_rpc
from baton.services.engine.multimodal.image_encoder import ImageEncoder
from baton.services.engine.multimodal.inputs import ImageSpan
from baton.services.transfer.base import TransferEngine, TransferState
from baton.services.transfer.factory import create_transfer_engine
from baton.services.worker.embedding_memory import EmbeddingArena

log = logging.getLogger(__name__)

LANDING_BYTES = 64 * 1024 * 1024
"""Default size of a worker's embedding landing arena."""

LATE_WRITE_GRACE_S = 10.0
"""How long past an attempt's encoder deadline its blocks stay quarantined (one-sided backends)."""

FENCING_BACKENDS = frozenset({"tcp"})
"""Transfer backends whose receiver refuses a write of a forgotten id (two-sided)."""


class WorkerImages:
    """Image handling of one worker (only for a vision-language model)."""

    def __init__(self, encoder: ImageEncoder, arena: EmbeddingArena, transfer: TransferEngine, role: str,
                 registry, credentials, encoder_timeout_s: float = 30.0,
                 late_write_grace_s: float = LATE_WRITE_GRACE_S) -> None:
        self.encoder, self.arena, self.transfer = encoder, arena, transfer
        self.role, self.credentials = role, credentials
        self.encoder_timeout_s = encoder_timeout_s
        self.late_write_grace_s = late_write_grace_s
        self.quarantined_blocks = 0
        """Landing blocks of failed attempts held back from the free list (one-sided backends)."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.local_images = Counter("baton_worker_images_encoded_locally", "Images this worker ran through its "
                                    "own vision tower (no encoder configured)", ["role"],
                                    registry=registry).labels(role=role)
        self.fetches = Counter("baton_worker_image_fetches", "Embedding fetches from encoders, by outcome",
                               ["role", "outcome"], registry=registry)

    @classmethod
    def create(cls, folder: str, device: torch.device, dtype: torch.dtype, role: str, worker_id: str,
               backend: str, transfer_options: dict, registry, credentials) -> "WorkerImages":
        """Load the processor (the tower only loads on first local use) and start the landing arena."""
        encoder = ImageEncoder(folder, device, dtype)
        arena = EmbeddingArena.with_bytes(LANDING_BYTES, encoder.hidden_size, dtype)
        transfer = create_transfer_engine(backend, f"{worker_id}/images", arena.memory, **transfer_options)
        return cls(encoder, arena, transfer, role, registry, credentials)

    # --- expansion -----------------------------------------------------------------
    def expand(self, prompt: Sequence[int], images: Sequence[worker_pb2.ImageInput]
               ) -> tuple[list[int], list[worker_pb2.ImageInput]]:
        """(expanded prompt, images with offset / num_tokens / grid / hash); ValueError for a bad image."""
        prepared = [self.encoder.describe(bytes(image.data)) for image in images]  # no pixel values needed here
        for image, ready in zip(images, prepared):
            if image.content_hash and image.content_hash != ready.content_hash:
                raise ValueError("an image's content_hash is not the sha256 of its data")
        expanded, spans = self.encoder.spans(prompt, prepared)
        out = [worker_pb2.ImageInput(data=image.data, content_hash=ready.content_hash, offset=span.offset,
                                     num_tokens=span.length, grid=list(ready.grid or ()))
               for image, ready, span in zip(images, prepared, spans)]
        return expanded, out

    @staticmethod
    def spans(images: Sequence[worker_pb2.ImageInput],
              embeddings: Optional[Sequence[torch.Tensor]] = None) -> list[ImageSpan]:
        """Engine spans of expanded images (with their embeddings when given)."""
        return [ImageSpan(offset=i.offset, length=i.num_tokens, content_hash=i.content_hash,
                          embeddings=None if embeddings is None else embeddings[k],
                          grid=tuple(i.grid) if i.grid else None) for k, i in enumerate(images)]

    # --- embeddings ----------------------------------------------------------------
    async def embeddings(self, request_id: str, images: Sequence[worker_pb2.ImageInput],
                         encoder_addresses: Sequence[str], deadline: float) -> list[torch.Tensor]:
        """Each image's embeddings [num_tokens, hidden]: from the first encoder that delivers, or
        from this worker's own tower when no encoder is configured."""
        if not encoder_addresses:
            return await asyncio.to_thread(self._encode_locally, images)
        failures = []
        for address in encoder_addresses:
            if time.monotonic() >= deadline:
                break
            try:
                out = await self._fetch(address, request_id, images, deadline)
                self.fetches.labels(role=self.role, outcome="ok").inc()
                return out
            except BatonError as error:
                if error.code == ErrorCode.INVALID_REQUEST:
                    raise
                self.fetches.labels(role=self.role, outcome="failed").inc()
                log.warning("encoder %s failed for %s: %s; trying the next", address, request_id, error.message)
                failures.append(f"{address}: {error.message}")
        raise BatonError(ErrorCode.NO_WORKER, "no encoder left for the request's images"
                         + (f" (tried {'; '.join(failures)})" if failures else " (its deadline passed)"),
                         origin=ErrorOrigin.ENCODER)

    def _encode_locally(self, images: Sequence[worker_pb2.ImageInput]) -> list[torch.Tensor]:
        prepared = [self.encoder.prepare(bytes(i.data)) for i in images]
        for image, ready in zip(images, prepared):
            if ready.num_tokens != image.num_tokens:
                raise ValueError(f"an image fills {ready.num_tokens} tokens here, {image.num_tokens} in the request")
        self.local_images.inc(len(prepared))
        return self.encoder.encode(prepared)

    async def _fetch(self, address: str, request_id: str, images: Sequence[worker_pb2.ImageInput],
                     deadline: float) -> list[torch.Tensor]:
        """Have the encoder at `address` write the embeddings into the landing arena; read them out."""
        blocks: list[list[int]] = []
        rendezvous = f"{request_id}/images/{time.monotonic_ns()}"  # per attempt: a retry is not fenced by this one
        landed = False
        timeout = max(0.001, min(self.encoder_timeout_s, deadline - time.monotonic()))
        encoder_deadline = time.monotonic() + timeout  # the encoder's own deadline starts later than this
        try:
            try:
                blocks = [self.arena.allocate(i.num_tokens) for i in images]
            except RuntimeError as error:
                raise BatonError(ErrorCode.OVERLOADED, f"embedding landing arena: {error}") from None
            destination = kv_pb2.KVDestination(rendezvous_id=rendezvous, peer=self.transfer.descriptor().to_proto(),
                                               block_ids=[b for run in blocks for b in run])
            request = worker_pb2.EncodeRequest(request_id=request_id, images=[i.data for i in images],
                                               destination=destination, timeout_ms=int(timeout * 1000))
            try:
                response = await worker_pb2_grpc.EncoderStub(self._channel(address)).Encode(request, timeout=timeout)
            except grpc.RpcError as error:
                raise error_from_rpc(error, default=ErrorCode.NO_WORKER) from None
            got = [(i.content_hash, i.num_tokens) for i in response.images]
            want = [(i.content_hash, i.num_tokens) for i in images]
            if got != want:
                raise BatonError(ErrorCode.INTERNAL, f"encoder answered images {got}, expected {want}")
            left = max(0.001, deadline - time.monotonic())
            state = await asyncio.to_thread(self.transfer.wait_received, rendezvous, min(left, 10.0))
            if state is not TransferState.SUCCESS:
                raise BatonError(ErrorCode.TRANSFER_FAILED, f"embeddings did not arrive (state {state.name})")
            out = [self.arena.load(run, i.num_tokens) for run, i in zip(blocks, images)]
            landed = True
            return out
        finally:
            self.transfer.forget(rendezvous)  # fenced before the blocks are freed: a late tcp write is refused
            self._release(blocks, None if landed or self.transfer.backend in FENCING_BACKENDS
                          else encoder_deadline + self.late_write_grace_s)

    def _release(self, blocks: list[list[int]], hold_until: Optional[float]) -> None:
        """Free the landing blocks now, or (a failed attempt on a one-sided backend) once no
        write of that attempt can still arrive."""
        if not blocks:
            return
        if hold_until is None:
            for run in blocks:
                self.arena.free(run)
            return
        count = sum(map(len, blocks))
        self.quarantined_blocks += count

        def release() -> None:
            self.quarantined_blocks -= count
            for run in blocks:
                self.arena.free(run)
        try:
            asyncio.get_running_loop().call_later(max(0.0, hold_until - time.monotonic()), release)
        except RuntimeError:  # no loop (called from a thread): a plain timer
            threading.Timer(max(0.0, hold_until - time.monotonic()), release).start()

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.credentials)
        return channel

    def close(self) -> None:
        """Close the landing transfer engine (the encoder channels close with the event loop)."""
        self.transfer.close()
