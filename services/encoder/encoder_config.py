"""Settings of an encoder process (`baton serve encoder`) beyond its model, gRPC server and transfer
(the transfer backend, worker id and hosts are the worker flags, `WorkerConfig`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderConfig:
    """How an encoder batches, caches and hands over image embeddings."""

    embedding_cache_bytes: int = 256 * 1024 * 1024
    """Bytes of the embedding cache (LRU by image content hash); also its transfer arena."""
    max_batch_images: int = 16
    """Most images one vision-tower call takes."""
    batch_wait_ms: float = 2.0
    """How long the first image of a batch waits for others to join it."""
    encode_timeout_s: float = 60.0
    """Longest one Encode call may take (compute + transfer) when the caller sets no deadline."""
    max_images_per_request: int = 64
    """Images one Encode call may carry."""

    def __post_init__(self) -> None:
        if self.embedding_cache_bytes <= 0 or self.max_batch_images < 1 or self.max_images_per_request < 1:
            raise ValueError("embedding_cache_bytes, max_batch_images and max_images_per_request must be positive")
        if self.batch_wait_ms < 0 or self.encode_timeout_s <= 0:
            raise ValueError("batch_wait_ms must not be negative and encode_timeout_s must be positive")
