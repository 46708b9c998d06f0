"""Regenerates (or checks) the committed Python code of the wire contracts.

Owns the one protoc invocation for `protos/baton/v1/*.proto`. Installed, the folder
`protos/` is the package `baton.protos`, so protoc runs on an include root where the
repository's `protos/` appears as `baton/protos/` (a symbolic link in a temporary folder):

    python -m grpc_tools.protoc -I STAGE --python_out=OUT --pyi_out=OUT --grpc_python_out=OUT \
        STAGE/baton/protos/baton/v1/*.proto

(in a child process, see `generate`). The .proto files import each other by those paths, and
the generated code imports `baton.protos.baton.v1.*`; the protobuf package stays `baton.v1`.

    python -m baton.protos.generate          # rewrite the generated files in place
    python -m baton.protos.generate --check  # exit 1 listing stale files; writes nothing

`stale_files()` is what `--check` and `tests/unit/protos/test_protos_fresh.py` use.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The directory holding `protos/` (the protoc include root)."""
PROTO_DIR = Path("protos/baton/v1")
"""Where the .proto files and their generated code live, relative to the repository root."""
INSTALLED_PREFIX = Path("baton")
"""What the repository's `protos/` is under in the installed namespace (`baton/protos`)."""
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
"""The files protoc writes for each `name.proto`: name_pb2.py, name_pb2.pyi, name_pb2_grpc.py."""


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    """The .proto files of the wire API, relative to `root`, sorted."""
    return sorted(p.relative_to(root) for p in (root / PROTO_DIR).glob("*.proto"))


def expected_outputs(proto: Path) -> list[Path]:
    """The generated files (relative to the root) that one .proto must have."""
    stem = proto.with_suffix("")
    return [stem.with_name(stem.name + suffix) for suffix in GENERATED_SUFFIXES]


def generate(out_dir: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every .proto under `root`, writing into `out_dir`; the written paths
    relative to `out_dir` (which mirror the paths relative to `root`)."""
    protos = proto_files(root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {root / PROTO_DIR}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="baton-protoc-") as tmp:
        stage, staged_out = Path(tmp) / "include", Path(tmp) / "out"
        (stage / INSTALLED_PREFIX).mkdir(parents=True)
        (stage / INSTALLED_PREFIX / "protos").symlink_to((root / "protos").resolve(), target_is_directory=True)
        staged_out.mkdir()
        _run_protoc(stage, staged_out, [INSTALLED_PREFIX / p for p in protos])
        written = [out for p in protos for out in expected_outputs(p)]
        for rel in written:
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staged_out / INSTALLED_PREFIX / rel, out_dir / rel)
    return written


def _run_protoc(include: Path, out: Path, protos: list[Path]) -> None:
    """protoc over `protos` (relative to `include`), Python + .pyi + gRPC output into `out`."""
    # protoc runs in a child process: grpc_tools' bundled C++ libraries, once loaded, crash a
    # later `import nixl` in the same process (clashing allocators: "munmap_chunk(): invalid pointer").
    script = ("import sys; from importlib import resources; from grpc_tools import protoc; "
              "sys.exit(protoc.main(sys.argv[1:] + ['-I' + str(resources.files('grpc_tools') / '_proto')]))")
    argv = [sys.executable, "-c", script, "grpc_tools.protoc", f"-I{include}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            *[str(include / p) for p in protos]]
    rc = subprocess.run(argv, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc} (its errors are on stderr)")


def stale_files(root: Path = REPO_ROOT) -> list[str]:
    """Committed generated files that differ from a fresh generation, are missing, or have
    no .proto any more; one line each ("path: why"). Empty when everything is fresh."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="baton-protos-") as tmp:
        fresh_dir = Path(tmp)
        expected = generate(fresh_dir, root)
        for rel in expected:
            committed = root / rel
            if not committed.exists():
                problems.append(f"{rel}: missing (not generated)")
            elif not filecmp.cmp(committed, fresh_dir / rel, shallow=False):
                problems.append(f"{rel}: differs from a fresh generation")
    known = set(expected)
    for suffix in GENERATED_SUFFIXES:
        for path in sorted((root / PROTO_DIR).glob("*" + suffix)):
            if path.relative_to(root) not in known:
                problems.append(f"{path.relative_to(root)}: generated file without a .proto")
    return problems


def main(argv: list[str] | None = None, root: Path = REPO_ROOT) -> int:
    """CLI entry point; returns the exit status (`root`: the repository to work on)."""
    parser = argparse.ArgumentParser(prog="python -m baton.protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder and exit 1 listing stale files")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files(root)
        for line in problems:
            print(line)
        if problems:
            print("regenerate with: python -m baton.protos.generate", file=sys.stderr)
            return 1
        print(f"{len(proto_files(root))} proto files: generated code is fresh")
        return 0
    written = generate(root, root)
    for rel in written:
        print(rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
