"""Packaging: one `baton` namespace, and dependency floors that match the generated code.

- The wheel holds the package `baton` (with `baton.services`, `baton.router`, ...) and no
  top-level `services`, `router`, `protos`, `deploy` or `bench`; `from baton import LLM`
  works from the built wheel, away from the checkout.
- `pyproject.toml` lists every package folder (setuptools cannot search a package-dir map).
- The grpcio / protobuf floors are the versions the committed generated code demands:
  generated gRPC code refuses a grpcio older than the grpcio-tools that wrote it, and the
  generated descriptors refuse an older protobuf runtime.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("services", "router", "protos", "deploy", "bench")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _floor(requirement_prefix: str) -> str:
    """The version after `>=` in the runtime dependency named exactly `requirement_prefix`."""
    for req in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(requirement_prefix)}\s*>=\s*([\d.]+)", req)
        if m:
            return m.group(1)
    raise AssertionError(f"no '{requirement_prefix}>=' floor in pyproject.toml dependencies")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _generated(suffix: str) -> list[Path]:
    files = sorted((REPO / "protos/baton/v1").glob(f"*{suffix}"))
    assert files, f"no generated *{suffix} files"
    return files


def test_grpcio_floors_equal_the_generator_version() -> None:
    generated = {re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", p.read_text()).group(1)
                 for p in _generated("_pb2_grpc.py")}
    assert len(generated) == 1, f"generated files disagree on grpcio: {generated}"
    (version,) = generated
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert _floor(name) == version, f"pyproject asks {name}>={_floor(name)}, generated code needs {version}"
    tools = [r for r in PYPROJECT["project"]["optional-dependencies"]["test"] if r.startswith("grpcio-tools")]
    assert tools == [f"grpcio-tools=={version}"], f"the generator pin {tools} is not the generated version {version}"


def test_protobuf_floor_covers_the_generated_descriptors() -> None:
    floor = _version_tuple(_floor("protobuf"))
    for path in _generated("_pb2.py"):
        m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
                      path.read_text())
        assert m, f"{path.name}: no runtime version check found"
        needed = tuple(int(x) for x in m.groups())
        assert floor >= needed and floor[0] == needed[0], f"{path.name} needs protobuf {needed}, floor is {floor}"


def test_every_package_folder_is_listed() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {"baton"} | {"baton." + ".".join(init.parent.relative_to(REPO / "baton").parts)
                           for init in (REPO / "baton").rglob("*/__init__.py")}  # the facade's own packages
    for folder in FOLDERS:
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO)
            on_disk.add("baton." + ".".join(rel.parts))
    assert on_disk - listed == set(), f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"listed but not on disk: {sorted(listed - on_disk)}"
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert mapping == {"baton": "baton", **{f"baton.{f}": f for f in FOLDERS}}


@pytest.mark.slow
def test_wheel_installs_one_baton_namespace(tmp_path: Path) -> None:
    # Build from a copy of the tracked tree: setuptools never cleans build/, so a wheel built
    # in the checkout could carry modules that were moved away.
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True, capture_output=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (REPO / rel).is_file():
            (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tmp_path / "src" / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(tmp_path / "src")], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("baton-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"baton"}, f"top-level entries besides baton: {sorted(tops)}"
    for folder in FOLDERS:
        assert f"baton/{folder}/__init__.py" in names
    assert "baton/protos/baton/v1/worker_pb2_grpc.py" in names
    assert "baton/bench/serving/result_schema.json" in names
    assert "baton/lang/runtime_endpoint.py" in names
    probe = ("import baton, baton.services, baton.router.core, baton.lang; from baton import LLM, SamplingParams; "
             "print(baton.__file__); print(baton.services.__file__); print(LLM.__module__)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout
    site = str(tmp_path / "site")
    baton_file, services_file, llm_module = out.split()
    assert baton_file.startswith(site) and services_file.startswith(site), out
    assert llm_module.startswith("baton.services.engine")
