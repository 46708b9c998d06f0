"""Blocks of registered memory packed into one contiguous byte buffer, and scattered back.

Owns the buffer layout the two-sided device backends send as a single message (nccl.py): for
`n` block ids, every registered tensor's `n` blocks in memory order (for the KV region K_0, V_0,
K_1, V_1, ...), each tensor's blocks in the order of the ids, as raw bytes (any dtype, fp8
included). One buffer per write keeps a request to one send, however many layers it has.
"""
from __future__ import annotations

import torch

from baton.services.transfer.memory import RegisteredMemory


def pack_blocks(memory: RegisteredMemory, src: list[int], where: torch.device) -> torch.Tensor:
    """The `src` blocks of every registered tensor as one flat uint8 buffer on `where` (gathered on
    the memory's own device, then moved if `where` differs)."""
    device, n = memory.device, len(src)
    idx = torch.tensor(src, dtype=torch.long).to(device, non_blocking=True)
    flat = torch.empty(n * memory.layout.bytes_per_block, dtype=torch.uint8, device=device)
    offset = 0
    for blocks, region in memory.tensor_blocks():
        size = n * region.geometry.block_bytes
        torch.index_select(blocks.view(torch.uint8), 0, idx, out=flat[offset:offset + size].view(n, -1))
        offset += size
    return flat if where == device else flat.to(where)


def unpack_blocks(memory: RegisteredMemory, packed: torch.Tensor, dst: list[int]) -> None:
    """Scatter a buffer `pack_blocks` made (for len(dst) blocks) into the `dst` blocks of `memory`
    (queued on the current stream on CUDA: the caller synchronizes before announcing them)."""
    device, n = memory.device, len(dst)
    idx = torch.tensor(dst, dtype=torch.long).to(device, non_blocking=True)
    packed = packed.to(device, non_blocking=True)
    offset = 0
    for blocks, region in memory.tensor_blocks():
        size = n * region.geometry.block_bytes
        blocks.view(torch.uint8).index_copy_(0, idx, packed[offset:offset + size].view(n, -1))
        offset += size
