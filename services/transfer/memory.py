"""What a transfer engine moves: registered memory, described without knowing who owns it.

Owns `RegisteredMemory` (in the spirit of vLLM's `register_kv_caches`, for any tensors): a
named set of `MemoryRegion`s, each a list of tensors cut into blocks by one `BlockGeometry`;
its peer-visible part, `MemoryLayout` of `RegionLayout`s (names, dimensions, dtype, block
counts; no tensors, no addresses), which two engines compare at handshake
(`layout_mismatches`); and the form of the KV-cache region, "kv" (`kv_region_layout`,
`kv_sizes`), which the wire's `baton.v1.KVLayout` describes. Image embeddings will be a
region of their own, with their own geometry.

Invariants:
- Block b of a region's tensor is the contiguous byte range [b * block_bytes, (b + 1) *
  block_bytes) of that tensor: every tensor is contiguous and holds exactly `num_blocks`
  blocks of `block_dims` elements of `dtype`.
- A region's tensors are listed in row-major order of its `tensor_dims` (the KV region:
  K_0, V_0, K_1, V_1, ...); a memory's tensors are its regions' tensors in region order.
- Every tensor of a memory lives on one device (DRAM or one GPU).
- Two peers may move blocks only when their layouts agree on everything but `num_blocks`
  (dtype and scales included: blocks move as raw bytes, an fp8 block means its values only
  under the scales it was written with).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

Dims = tuple[tuple[str, int], ...]
"""Named dimensions, outermost first: (("page_size", 16), ("num_kv_heads", 8), ...)."""

KV_REGION = "kv"
"""Name of the KV-cache region."""
KV_TENSOR_DIMS = ("num_layers", "kv")
"""The KV region's tensors: per layer, K then V."""
KV_BLOCK_DIMS = ("page_size", "num_kv_heads", "head_dim")
"""One KV block of one tensor: page_size tokens x num_kv_heads heads x head_dim."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32"."""
    return str(dtype).removeprefix("torch.")


def _check_dims(dims: Dims, what: str) -> None:
    names = [name for name, _ in dims]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names repeat: {names}")
    if any(size < 0 for _, size in dims):
        raise ValueError(f"{what} sizes must not be negative: {dims}")


def _show(dims: Dims) -> str:
    return "(" + ", ".join(f"{name}={size}" for name, size in dims) + ")"


@dataclass(frozen=True)
class BlockGeometry:
    """How each tensor of a region is cut into blocks."""

    num_blocks: int
    """Blocks per tensor (the one figure two peers may disagree on)."""
    block_dims: Dims
    """Named dimensions of one block of one tensor, outermost first."""
    dtype: torch.dtype
    """Element type."""

    def __post_init__(self) -> None:
        if self.num_blocks < 0:
            raise ValueError("num_blocks must not be negative")
        _check_dims(self.block_dims, "block dimension")

    @property
    def block_elements(self) -> int:
        """Elements in one block of one tensor."""
        return math.prod(size for _, size in self.block_dims)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one tensor."""
        return self.block_elements * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class RegionLayout:
    """One region as a peer sees it: its name, how its tensors are indexed and cut."""

    name: str
    """Which memory this is ("kv", later e.g. image embeddings)."""
    tensor_dims: Dims
    """Named axes over the region's tensors, outermost first (tensors in row-major order)."""
    geometry: BlockGeometry
    """How each of its tensors is cut into blocks."""
    scales: tuple[float, ...] = ()
    """Dequantisation multipliers the owner applies to the stored elements (an fp8 KV cache: one
    per layer, K or V and head, in the owner's order); empty when the stored values are the values.
    Blocks move as raw bytes, so two peers must agree on them exactly."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a region needs a name")
        _check_dims(self.tensor_dims, "tensor dimension")

    @property
    def num_tensors(self) -> int:
        """Tensors registered in this region."""
        return math.prod(size for _, size in self.tensor_dims)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for in this region (every tensor's block)."""
        return self.num_tensors * self.geometry.block_bytes


@dataclass(frozen=True)
class MemoryLayout:
    """Every region of a registered memory, as peers compare them."""

    regions: tuple[RegionLayout, ...]

    def __post_init__(self) -> None:
        names = [r.name for r in self.regions]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a memory layout needs regions with distinct names, got {names}")

    def region(self, name: str) -> RegionLayout:
        """The region called `name` (KeyError when there is none)."""
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    @property
    def num_blocks(self) -> int:
        """Block ids valid in every region."""
        return min(r.geometry.num_blocks for r in self.regions)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for (every tensor of every region)."""
        return sum(r.bytes_per_block for r in self.regions)


def _dims_mismatches(prefix: str, local: Dims, remote: Dims) -> list[str]:
    if [n for n, _ in local] != [n for n, _ in remote]:
        return [f"{prefix}: local={_show(local)} remote={_show(remote)}"]
    return [f"{prefix}.{name}: local={a} remote={b}" for (name, a), (_, b) in zip(local, remote) if a != b]


def layout_mismatches(local: MemoryLayout, remote: MemoryLayout) -> list[str]:
    """What must agree but does not, as "region.field: local=X remote=Y" (num_blocks may differ)."""
    out = []
    for mine in local.regions:
        try:
            theirs = remote.region(mine.name)
        except KeyError:
            out.append(f"region {mine.name!r}: local only")
            continue
        out += _dims_mismatches(mine.name, mine.tensor_dims, theirs.tensor_dims)
        out += _dims_mismatches(mine.name, mine.geometry.block_dims, theirs.geometry.block_dims)
        if mine.geometry.dtype != theirs.geometry.dtype:
            out.append(f"{mine.name}.dtype: local={dtype_name(mine.geometry.dtype)} "
                       f"remote={dtype_name(theirs.geometry.dtype)}")
        elif mine.scales != theirs.scales:
            out.append(_scales_mismatch(mine.name, mine.scales, theirs.scales))
    names = {r.name for r in local.regions}
    out += [f"region {r.name!r}: remote only" for r in remote.regions if r.name not in names]
    return out


def _scales_mismatch(name: str, local: tuple[float, ...], remote: tuple[float, ...]) -> str:
    if len(local) != len(remote):
        return f"{name}.scales: local has {len(local)} remote has {len(remote)}"
    first = next(i for i, (a, b) in enumerate(zip(local, remote)) if a != b)
    count = sum(a != b for a, b in zip(local, remote))
    return f"{name}.scales[{first}]: local={local[first]:.6g} remote={remote[first]:.6g} ({count} differ)"


@dataclass(frozen=True)
class MemoryRegion:
    """One named set of registered tensors sharing a block geometry."""

    layout: RegionLayout
    tensors: tuple[torch.Tensor, ...]
    """In row-major order of `layout.tensor_dims`."""

    def __post_init__(self) -> None:
        layout, geometry = self.layout, self.layout.geometry
        if len(self.tensors) != layout.num_tensors:
            raise ValueError(f"region {layout.name!r} has {len(self.tensors)} tensors, its dimensions "
                             f"{_show(layout.tensor_dims)} say {layout.num_tensors}")
        want = geometry.num_blocks * geometry.block_elements
        for i, tensor in enumerate(self.tensors):
            if tensor.dtype != geometry.dtype or tensor.numel() != want or not tensor.is_contiguous():
                raise ValueError(
                    f"region {layout.name!r} tensor {i} ({dtype_name(tensor.dtype)}, {tensor.numel()} elements, "
                    f"contiguous={tensor.is_contiguous()}) is not {geometry.num_blocks} contiguous blocks of "
                    f"{_show(geometry.block_dims)} {dtype_name(geometry.dtype)}")

    def blocks(self, index: int) -> torch.Tensor:
        """Tensor `index` as a [num_blocks, block_elements] view (row b = block b)."""
        return self.tensors[index].view(self.layout.geometry.num_blocks, -1)


@dataclass(frozen=True)
class RegisteredMemory:
    """The tensors a transfer engine registers and moves blocks of, region by region."""

    regions: tuple[MemoryRegion, ...]

    def __post_init__(self) -> None:
        MemoryLayout(tuple(r.layout for r in self.regions))  # names distinct, at least one
        devices = {t.device for t in self.tensors}
        if len(devices) != 1:
            raise ValueError(f"registered tensors must share one device, got {sorted(map(str, devices))}")

    @property
    def layout(self) -> MemoryLayout:
        """What a peer is told (and compares) about this memory."""
        return MemoryLayout(tuple(r.layout for r in self.regions))

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every registered tensor, in region order."""
        return tuple(t for r in self.regions for t in r.tensors)

    @property
    def device(self) -> torch.device:
        return self.regions[0].tensors[0].device

    def tensor_blocks(self) -> list[tuple[torch.Tensor, RegionLayout]]:
        """(tensor as a [num_blocks, block_elements] view, its region) for every tensor, in order."""
        return [(r.blocks(i), r.layout) for r in self.regions for i in range(len(r.tensors))]


def kv_region_layout(*, num_layers: int, num_blocks: int, page_size: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype, scales: tuple[float, ...] = ()) -> RegionLayout:
    """The KV-cache region: a K and a V tensor per layer, blocks of page_size tokens (`scales`:
    an fp8 cache's dequantisation multipliers, as `RegionLayout.scales`)."""
    return RegionLayout(KV_REGION, ((KV_TENSOR_DIMS[0], num_layers), (KV_TENSOR_DIMS[1], 2)),
                        BlockGeometry(num_blocks, tuple(zip(KV_BLOCK_DIMS, (page_size, num_kv_heads, head_dim))),
                                      dtype), tuple(float(s) for s in scales))


def kv_sizes(layout: MemoryLayout) -> dict[str, Any]:
    """The KV region's figures by name (num_layers, num_blocks, page_size, num_kv_heads,
    head_dim, dtype): the arguments of `kv_region_layout`. ValueError unless `layout` is
    exactly one region of that form."""
    if [r.name for r in layout.regions] != [KV_REGION]:
        raise ValueError(f"not a KV-cache layout: regions {[r.name for r in layout.regions]}")
    region = layout.regions[0]
    tensor_dims, block_dims = dict(region.tensor_dims), dict(region.geometry.block_dims)
    if tuple(tensor_dims) != KV_TENSOR_DIMS or tensor_dims["kv"] != 2 or tuple(block_dims) != KV_BLOCK_DIMS:
        raise ValueError(f"region {KV_REGION!r} is not in the KV-cache form: tensors {_show(region.tensor_dims)}, "
                         f"blocks {_show(region.geometry.block_dims)}")
    return dict(num_layers=tensor_dims["num_layers"], num_blocks=region.geometry.num_blocks, **block_dims,
                dtype=region.geometry.dtype)
