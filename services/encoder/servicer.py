"""The encoder's gRPC service (`baton.v1.Encoder`) and its process main (`baton serve encoder`).

A request's life through the encoder (`Encoder.Encode`, called by a prefill or decode worker):
1. Admission (NOT_READY while the tower loads, DRAINING, too many images), then each image
   is decoded and preprocessed by the folder's image processor and hashed (sha256).
2. Each image is looked up in the embedding cache; a miss joins the tower batcher (images
   arriving together run in one tower call; a request for an image already being computed
   shares that computation) and the result enters the cache.
3. With a destination, the images' cache blocks are written straight into the caller's
   embedding arena through the transfer engine (tcp or nixl), the rendezvous id notifying the
   write: the embeddings never travel inside the gRPC message. The answer carries each image's
   hash, embedding count and grid, the bytes moved and the cache hits.
Every wait is bounded by the request's deadline, and no write starts after it (the caller's
landing blocks may be reused by then; see services/worker/images.py).
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Callable, Optional

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import derive_key
from baton.protos.errors import BatonError, ErrorCode, abort_with
from baton.services.common.server import ServerConfig, ServiceServer
from baton.services.encoder.batcher import TowerBatcher
from baton.services.encoder.embedding_cache import EmbeddingCache
from baton.services.encoder.encoder_config import EncoderConfig
from baton.services.engine.config import EngineConfig
from baton.services.engine.multimodal.image_encoder import ImageEncoder
from baton.services.transfer.base import LayoutMismatch, PeerDescriptor, TransferError, TransferState
from baton.services.transfer.factory import create_transfer_engine
from baton.services.worker.embedding_memory import ArenaFull, EmbeddingArena
from baton.services.worker.worker_config import WorkerConfig

log = logging.getLogger(__name__)


class EncoderMetrics:
    """The `baton_encoder_` metrics, on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("baton_encoder_requests", "Encode calls by outcome", ["status"], registry=r)
        self.images = Counter("baton_encoder_images", "Images received", registry=r)
        self.tower_images = Counter("baton_encoder_tower_images", "Images run through the vision tower", registry=r)
        self.tower_batches = Counter("baton_encoder_tower_batches", "Vision-tower calls", registry=r)
        self.cache_hits = Counter("baton_encoder_embedding_cache_hits", "Images found in the embedding cache",
                                  registry=r)
        self.cache_misses = Counter("baton_encoder_embedding_cache_misses", "Images not in the embedding cache",
                                    registry=r)
        self.hit_ratio = Gauge("baton_encoder_embedding_cache_hit_ratio", "Embedding-cache hits / lookups",
                               registry=r)
        self.cache_bytes = Gauge("baton_encoder_embedding_cache_bytes", "Bytes held by cached embeddings",
                                 registry=r)
        self.transfer_bytes = Counter("baton_encoder_transfer_bytes", "Embedding bytes written to workers",
                                      registry=r)


class EncoderServicer(worker_pb2_grpc.EncoderServicer):
    """Images in, embeddings into the caller's memory."""

    def __init__(self, engine_config: EngineConfig, config: EncoderConfig, worker_config: WorkerConfig,
                 metrics: EncoderMetrics) -> None:
        self.engine_config, self.config, self.metrics = engine_config, config, metrics
        self.worker_config = worker_config
        self.worker_id = worker_config.worker_id
        self.encoder: Optional[ImageEncoder] = None
        self.cache: Optional[EmbeddingCache] = None
        self.batcher: Optional[TowerBatcher] = None
        self.transfer = None
        self.ready = False
        self.draining = False

    async def load(self, worker_id: str, transfer_options: dict) -> None:
        """Load the processor and the tower, the cache arena and the transfer engine."""
        self.worker_id = self.worker_config.worker_id or worker_id
        device = torch.device("cuda" if self.engine_config.device in ("auto", "cuda") and torch.cuda.is_available()
                              else "cpu")
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        dtype = names.get(self.engine_config.dtype, torch.float32 if device.type == "cpu" else torch.bfloat16)
        self.encoder = await asyncio.to_thread(ImageEncoder, self.engine_config.model, device, dtype)
        await asyncio.to_thread(lambda: self.encoder.vision)  # the tower loads now, not on the first request
        arena = EmbeddingArena.with_bytes(self.config.embedding_cache_bytes, self.encoder.hidden_size, dtype)
        self.cache = EmbeddingCache(arena)
        self.transfer = await asyncio.to_thread(create_transfer_engine, self.worker_config.transfer,
                                                f"{self.worker_id}/images", arena.memory, **transfer_options)
        self.batcher = TowerBatcher(self.encoder, self.config.max_batch_images, self.config.batch_wait_ms / 1000,
                                    on_batch=self._count_batch)
        self.batcher.start()
        self.ready = True

    async def Encode(self, request: worker_pb2.EncodeRequest, context: grpc.aio.ServicerContext
                     ) -> worker_pb2.EncodeResponse:
        try:
            response = await self._encode(request)
            self.metrics.requests.labels(status="ok").inc()
            return response
        except BatonError as error:
            self.metrics.requests.labels(status=error.code_name.lower()).inc()
            await abort_with(context, error)

    async def _encode(self, request: worker_pb2.EncodeRequest) -> worker_pb2.EncodeResponse:
        if self.draining:
            raise BatonError(ErrorCode.DRAINING, f"encoder {self.worker_id} is draining")
        if not self.ready:
            raise BatonError(ErrorCode.NOT_READY, "the encoder is still loading its vision tower")
        if len(request.images) > self.config.max_images_per_request:
            raise BatonError(ErrorCode.INVALID_REQUEST, f"{len(request.images)} images; at most "
                             f"{self.config.max_images_per_request} per request")
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self.config.encode_timeout_s
        deadline = time.monotonic() + timeout
        self.metrics.images.inc(len(request.images))
        try:
            prepared = await asyncio.to_thread(lambda: [self.encoder.prepare(bytes(d)) for d in request.images])
        except ValueError as error:
            raise BatonError(ErrorCode.INVALID_REQUEST, str(error)) from None
        entries, hits = [], 0
        try:
            for image in prepared:
                entry = self.cache.lookup(image.content_hash)
                if entry is None:
                    self.metrics.cache_misses.inc()
                    entry = await self._compute(image, deadline)
                else:
                    hits += 1
                    self.metrics.cache_hits.inc()
                entries.append(entry)
            self.metrics.hit_ratio.set(self.cache.hit_rate)
            self.metrics.cache_bytes.set(self.cache.used_bytes)
            moved = await self._write(request, entries, deadline) if request.HasField("destination") else 0
        finally:
            for entry in entries:
                self.cache.unpin(entry)
        return worker_pb2.EncodeResponse(
            request_id=request.request_id, num_embedding_tokens=[i.num_tokens for i in prepared],
            images=[worker_pb2.ImageInput(content_hash=i.content_hash, num_tokens=i.num_tokens,
                                          grid=list(i.grid or ())) for i in prepared],
            bytes_transferred=moved, cache_hits=hits)

    def _count_batch(self, images: int) -> None:
        self.metrics.tower_batches.inc()
        self.metrics.tower_images.inc(images)

    async def _compute(self, image, deadline: float):
        try:
            embeddings = await asyncio.wait_for(self.batcher.encode(image), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "the vision tower did not finish within the deadline") \
                from None
        except ValueError as error:
            raise BatonError(ErrorCode.INVALID_REQUEST, str(error)) from None
        try:
            return self.cache.insert(image.content_hash, embeddings, image.grid or ())
        except ArenaFull as error:
            raise BatonError(ErrorCode.OVERLOADED, str(error)) from None

    async def _write(self, request: worker_pb2.EncodeRequest, entries, deadline: float) -> int:
        destination = request.destination
        pairs, dst = [], list(destination.block_ids)
        for entry in entries:
            pairs.extend(zip(entry.blocks, dst[len(pairs):len(pairs) + len(entry.blocks)]))
        if len(pairs) != len(dst) or len(dst) != sum(len(e.blocks) for e in entries):
            raise BatonError(ErrorCode.INVALID_REQUEST, f"the destination offers {len(dst)} blocks for "
                             f"{sum(len(e.blocks) for e in entries)}")
        try:
            peer = PeerDescriptor.from_proto(destination.peer)
            await asyncio.to_thread(self.transfer.connect, peer)
        except LayoutMismatch as error:
            raise BatonError(ErrorCode.LAYOUT_MISMATCH, str(error)) from None
        except (TransferError, ValueError) as error:
            raise BatonError(ErrorCode.TRANSFER_FAILED, f"handshake with {destination.peer.worker_id} failed: "
                             f"{error}") from None
        if time.monotonic() >= deadline:  # the caller has given up: a one-sided write now could land in reused blocks
            raise BatonError(ErrorCode.DEADLINE_EXCEEDED, "the caller's deadline passed before the embedding write")
        handle = await asyncio.to_thread(self.transfer.write, peer.worker_id, destination.rendezvous_id, pairs,
                                         max(0.001, deadline - time.monotonic()))
        if handle.state is not TransferState.SUCCESS:
            raise BatonError(ErrorCode.TRANSFER_FAILED, f"embedding write to {peer.worker_id} failed: {handle.error}")
        self.metrics.transfer_bytes.inc(handle.bytes)
        return handle.bytes

    async def Info(self, request: worker_pb2.WorkerInfoRequest, context) -> worker_pb2.WorkerInfo:
        info = worker_pb2.WorkerInfo(role=worker_pb2.ENCODER, worker_id=self.worker_id or "",
                                     model=self.engine_config.model, ready=self.ready, draining=self.draining)
        if self.ready:
            info.epoch = self.transfer.epoch
            info.load.CopyFrom(worker_pb2.WorkerLoad(running_requests=self.batcher.in_progress,
                                                     prefix_hit_rate=self.cache.hit_rate))
        return info

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work and wait (bounded) for the images in progress."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.batcher is not None and self.batcher.in_progress and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self.transfer is not None:
            self.transfer.close()


async def serve_encoder(engine_config: EngineConfig, server_config: ServerConfig, config: EncoderConfig,
                        worker_config: WorkerConfig, *, signals: bool = True,
                        on_serving: Optional[Callable[[ServiceServer], None]] = None) -> int:
    """Run one encoder until it is drained; returns the exit code. `signals`: SIGTERM / SIGINT
    drain it (main thread only); `on_serving` is called with the server once health is SERVING
    (a Ray actor, deploy/ray_launcher.py)."""
    if worker_config.transfer not in ("tcp", "nixl"):
        print("baton encoder: --transfer must be tcp or nixl", file=sys.stderr, flush=True)
        return 2
    registry = CollectorRegistry()
    servicer = EncoderServicer(engine_config, config, worker_config, EncoderMetrics(registry))
    server = ServiceServer(server_config, registry=registry,
                           on_drain=lambda: servicer.drain(server_config.drain_timeout_s))
    server.add_servicer(worker_pb2_grpc.add_EncoderServicer_to_server, servicer)
    await server.start()
    if signals:
        server.install_signal_handlers()
    options = {"auth_key": derive_key(server.credentials.secret, "kv transfer")}
    if worker_config.transfer == "tcp":
        options.update(host=worker_config.transfer_host or server_config.host,
                       advertise_host=worker_config.advertise_host or None)
    try:
        await servicer.load(server.address, options)
    except Exception as error:
        print(f"baton encoder: failed to load the vision tower: {error}", file=sys.stderr, flush=True)
        await server.stop(0)
        return 1
    await server.set_serving(True)
    print(f"baton encoder worker serving on {server.address} (metrics :{server.metrics_port}, "
          f"transfer {worker_config.transfer})", flush=True)
    if on_serving is not None:
        on_serving(server)
    await server.wait_for_termination()
    await servicer.close()
    return 0


def run_encoder(engine_config: EngineConfig, server_config: ServerConfig, config: EncoderConfig,
                worker_config: WorkerConfig) -> int:
    """Blocking entry point used by the CLI."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s encoder %(levelname)s %(message)s")
    return asyncio.run(serve_encoder(engine_config, server_config, config, worker_config))
