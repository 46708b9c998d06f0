from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_BACKEND_UNSPECIFIED: _ClassVar[TransferBackend]
    TCP: _ClassVar[TransferBackend]
    NIXL: _ClassVar[TransferBackend]
    NCCL: _ClassVar[TransferBackend]
    CUDA_IPC: _ClassVar[TransferBackend]
TRANSFER_BACKEND_UNSPECIFIED: TransferBackend
TCP: TransferBackend
NIXL: TransferBackend
NCCL: TransferBackend
CUDA_IPC: TransferBackend

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "page_size", "num_kv_heads", "head_dim", "dtype", "num_blocks", "scales")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    num_blocks: int
    scales: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, num_layers: _Optional[int] = ..., page_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., num_blocks: _Optional[int] = ..., scales: _Optional[_Iterable[float]] = ...) -> None: ...

class TransferPeer(_message.Message):
    __slots__ = ("worker_id", "epoch", "backend", "metadata", "layout")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    backend: TransferBackend
    metadata: bytes
    layout: KVLayout
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., backend: _Optional[_Union[TransferBackend, str]] = ..., metadata: _Optional[bytes] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ...) -> None: ...

class KVDestination(_message.Message):
    __slots__ = ("rendezvous_id", "peer", "start_token", "block_ids")
    RENDEZVOUS_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    rendezvous_id: str
    peer: TransferPeer
    start_token: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rendezvous_id: _Optional[str] = ..., peer: _Optional[_Union[TransferPeer, _Mapping]] = ..., start_token: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KVHandoff(_message.Message):
    __slots__ = ("rendezvous_id", "source_worker", "destination_worker", "source_epoch", "destination_epoch", "block_ids", "layout", "backend", "bytes_transferred")
    RENDEZVOUS_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WORKER_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_WORKER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_EPOCH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    rendezvous_id: str
    source_worker: str
    destination_worker: str
    source_epoch: int
    destination_epoch: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    layout: KVLayout
    backend: TransferBackend
    bytes_transferred: int
    def __init__(self, rendezvous_id: _Optional[str] = ..., source_worker: _Optional[str] = ..., destination_worker: _Optional[str] = ..., source_epoch: _Optional[int] = ..., destination_epoch: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., backend: _Optional[_Union[TransferBackend, str]] = ..., bytes_transferred: _Optional[int] = ...) -> None: ...
