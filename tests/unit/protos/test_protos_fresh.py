"""The committed generated code matches the .proto files, and the generated modules work.

When this fails, run `python -m baton.protos.generate` from the repository root and commit the result.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from baton.protos import generate


def test_committed_generated_code_is_fresh() -> None:
    problems = generate.stale_files()
    assert not problems, "stale generated protobuf code (run `python -m baton.protos.generate`):\n" + "\n".join(problems)


def test_every_proto_has_generated_files() -> None:
    protos = generate.proto_files()
    assert {p.name for p in protos} >= {"common.proto", "kv.proto", "worker.proto", "router.proto"}
    for proto in protos:
        for rel in generate.expected_outputs(proto):
            assert (generate.REPO_ROOT / rel).is_file(), f"{proto} has no {rel.name}"


def _copy_protos(tmp_path: Path) -> Path:
    shutil.copytree(generate.REPO_ROOT / generate.PROTO_DIR, tmp_path / generate.PROTO_DIR,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_check_reports_edited_missing_and_orphan_files(tmp_path: Path) -> None:
    root = _copy_protos(tmp_path)
    v1 = root / generate.PROTO_DIR
    (v1 / "common_pb2.py").write_text((v1 / "common_pb2.py").read_text() + "# edited\n")
    (v1 / "kv_pb2_grpc.py").unlink()
    (v1 / "extra.proto").write_text('syntax = "proto3";\npackage baton.v1;\nmessage Extra { int32 x = 1; }\n')
    (v1 / "gone_pb2.py").write_text("")
    problems = "\n".join(generate.stale_files(root))
    assert "common_pb2.py: differs" in problems
    assert "kv_pb2_grpc.py: missing" in problems
    assert "extra_pb2.py: missing" in problems and "extra_pb2.pyi: missing" in problems
    assert "gone_pb2.py: generated file without a .proto" in problems
    assert "worker_pb2.py" not in problems


def test_check_cli_exit_status(tmp_path: Path, capsys) -> None:
    assert generate.main(["--check"]) == 0
    root = _copy_protos(tmp_path)
    (root / generate.PROTO_DIR / "worker_pb2.pyi").write_text("")
    assert generate.main(["--check"], root=root) == 1
    assert "worker_pb2.pyi: differs" in capsys.readouterr().out
    assert generate.main([], root=root) == 0  # regenerating repairs it
    assert generate.main(["--check"], root=root) == 0


def test_services_import_and_messages_round_trip() -> None:
    from baton.protos.baton.v1 import common_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

    for name in ("PrefillStub", "DecodeStub", "EncoderStub", "add_DecodeServicer_to_server"):
        assert hasattr(worker_pb2_grpc, name)
    assert hasattr(router_pb2_grpc, "RouterStub")
    assert worker_pb2.DESCRIPTOR.services_by_name["Decode"].full_name == "baton.v1.Decode"

    params = common_pb2.SamplingParams(n=2, max_tokens=8, temperature=0.5, stop=["\n"],
                                       structured_output=common_pb2.StructuredOutput(regex="[a-z]+"))
    request = worker_pb2.DecodeRequest(request_id="r1", prompt_token_ids=[1, 2, 3], params=params)
    decoded = worker_pb2.DecodeRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.params.HasField("max_tokens") and not decoded.params.HasField("top_p")
    assert decoded.params.structured_output.WhichOneof("kind") == "regex"
