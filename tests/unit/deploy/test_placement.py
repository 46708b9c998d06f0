"""`baton up` placement: one GPU per worker while there are enough, an explicit memory share
when workers share a GPU, physical indices through an inherited CUDA_VISIBLE_DEVICES."""
from __future__ import annotations

import pytest

from baton.deploy.launcher import Cluster, UpConfig, _visible_env, engine_flags
from baton.deploy.placement import MULTICAST_OFF, Placement, parse_gpus, place_workers
from baton.services.engine.config import EngineConfig


def test_one_gpu_each_when_there_are_enough() -> None:
    assert place_workers(2, [0, 1, 2, 3], 0.85) == [Placement(0, 0.85), Placement(1, 0.85)]


def test_workers_sharing_a_gpu_split_its_memory() -> None:
    assert place_workers(2, [0], 0.85) == [Placement(0, 0.425), Placement(0, 0.425)]
    assert place_workers(3, [4, 5], 0.9) == [Placement(4, 0.45), Placement(5, 0.9), Placement(4, 0.45)]


def test_no_gpus_no_placement() -> None:
    assert place_workers(2, [], 0.85) == [Placement(None, None)] * 2
    assert Placement(None, None).env() == {}


@pytest.mark.parametrize("text, gpus", [("", []), ("0", [0]), ("0, 2,3", [0, 2, 3])])
def test_parse_gpus(text: str, gpus: list[int]) -> None:
    assert parse_gpus(text) == gpus


@pytest.mark.parametrize("text", ["a", "0,0", "-1"])
def test_bad_gpus_are_refused_clearly(text: str) -> None:
    with pytest.raises(ValueError, match="--gpus"):
        UpConfig(gpus=text)


def test_inherited_visible_devices_map_to_physical(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert _visible_env(Placement(1, 0.85)) == {"CUDA_VISIBLE_DEVICES": "6"}
    with pytest.raises(ValueError, match="not among"):
        _visible_env(Placement(2, 0.85))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _visible_env(Placement(3, 0.85)) == {"CUDA_VISIBLE_DEVICES": "3"}


def test_worker_flags_carry_the_share_not_the_global_fraction() -> None:
    engine = EngineConfig(mem_fraction_static=0.8, device="cuda:1", page_size=8)
    cluster = Cluster(UpConfig(), engine)
    assert "--mem-fraction-static" not in engine_flags(engine) and "--device" not in engine_flags(engine)
    assert cluster._placed(Placement(1, 0.4)) == ["--device", "cuda", "--mem-fraction-static", "0.4"]
    assert Cluster(UpConfig(), EngineConfig(device="cpu"))._placed(Placement(None, None)) == ["--device", "cpu"]
    assert set(MULTICAST_OFF) == {"NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"}


def test_auto_transfer_follows_the_placement(monkeypatch) -> None:
    from baton.deploy.placement import choose_transfer, ray_transfer

    one_gpu, two_gpus, cpu = place_workers(2, [0], 0.85), place_workers(2, [0, 1], 0.85), place_workers(2, [], 0.85)
    assert choose_transfer("auto", one_gpu) == "cuda_ipc"
    assert choose_transfer("auto", cpu) == "tcp" and ray_transfer("auto", on_gpu=False) == "tcp"
    assert choose_transfer("tcp", one_gpu) == "tcp" and choose_transfer("nixl", cpu) == "nixl"
    assert ray_transfer("cuda_ipc", on_gpu=True) == "cuda_ipc"
    assert choose_transfer("nccl", two_gpus) == "nccl" and choose_transfer("nccl", cpu) == "nccl"  # opt-in only
    with pytest.raises(ValueError, match="nccl needs the workers on different GPUs"):
        choose_transfer("nccl", one_gpu)
    import importlib.util
    across = "nixl" if importlib.util.find_spec("nixl") is not None else "tcp"
    assert choose_transfer("auto", two_gpus) == across and ray_transfer("auto", on_gpu=True) == across
    monkeypatch.setitem(__import__("sys").modules, "nixl", None)  # NIXL not installed: tcp across GPUs
    assert choose_transfer("auto", two_gpus) == "tcp" and ray_transfer("auto", on_gpu=True) == "tcp"


def test_up_config_names_the_transfer_backends() -> None:
    assert UpConfig().transfer == "auto"
    for name in ("auto", "tcp", "nixl", "cuda_ipc", "nccl"):
        UpConfig(transfer=name)
    with pytest.raises(ValueError, match="auto, tcp, nixl, cuda_ipc or nccl"):
        UpConfig(transfer="rdma")


def test_tensor_parallel_workers_get_consecutive_gpus(monkeypatch) -> None:
    four = place_workers(2, [0, 1, 2, 3], 0.85, tp=2)
    assert [p.all_gpus for p in four] == [(0, 1), (2, 3)] and [p.mem_fraction for p in four] == [0.85, 0.85]
    assert four[1].env() == {"CUDA_VISIBLE_DEVICES": "2,3"}
    shared = place_workers(2, [0, 1], 0.8, tp=2)  # the colocated baseline: both workers on both GPUs
    assert [p.all_gpus for p in shared] == [(0, 1), (0, 1)] and [p.mem_fraction for p in shared] == [0.4, 0.4]
    with pytest.raises(ValueError, match="--tp 2 puts each rank of a worker on its own GPU"):
        place_workers(1, [0], 0.85, tp=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert _visible_env(four[1]) == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert engine_flags(EngineConfig(tp_size=2)) == ["--tp-size", "2"]
    with pytest.raises(ValueError, match="add --prefills 0"):  # refused before anything starts
        Cluster(UpConfig(prefills=1), EngineConfig(tp_size=2, device="cpu")).start()
