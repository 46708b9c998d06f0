"""Batches images through the vision tower: one tower call for the images that arrive together.

An image waits at most `batch_wait_ms` for others (up to `max_batch_images`); the batch runs
on one dedicated thread (the tower never runs on the event loop). Two requests for the same
image while it is being computed share one computation.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

from baton.services.engine.multimodal.image_encoder import ImageEncoder, PreparedImage


class TowerBatcher:
    """Collects images and runs them through an `ImageEncoder` in batches."""

    def __init__(self, encoder: ImageEncoder, max_batch: int, wait_s: float,
                 on_batch: Callable[[int], None] = lambda images: None) -> None:
        self.encoder, self.max_batch, self.wait_s = encoder, max_batch, wait_s
        self.on_batch = on_batch
        """Called with the image count of every tower call that succeeded (the metrics)."""
        self._queue: asyncio.Queue = asyncio.Queue()
        self._inflight: dict[str, asyncio.Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vision-tower")
        self._task: Optional[asyncio.Task] = None
        self.in_progress = 0
        """Images queued or running now (the encoder's load)."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def encode(self, image: PreparedImage) -> torch.Tensor:
        """The image's embeddings [num_tokens, hidden] (shared with a concurrent request for it)."""
        future = self._inflight.get(image.content_hash)
        if future is None:
            future = self._inflight[image.content_hash] = asyncio.get_running_loop().create_future()
            self.in_progress += 1
            await self._queue.put((image, future))
        return await asyncio.shield(future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                left = deadline - loop.time()
                try:
                    batch.append(self._queue.get_nowait() if left <= 0 else
                                 await asyncio.wait_for(self._queue.get(), left))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            images = [image for image, _ in batch]
            try:
                outputs = await loop.run_in_executor(self._pool, self.encoder.encode, images)
                results: list = outputs
                self.on_batch(len(images))
            except Exception as error:  # one bad batch fails its own requests, never the loop
                results = [error] * len(batch)
            for (image, future), result in zip(batch, results):
                self._inflight.pop(image.content_hash, None)
                self.in_progress -= 1
                if not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
