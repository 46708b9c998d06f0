"""The `baton` command line: one sub-command per job.

- `baton generate PROMPT...`: offline generation with the in-process engine (the embedded
  SmolLM2-135M-Instruct unless --model is given); prompts go through the chat template
  unless --raw.
- `baton serve prefill|decode`: one worker service (gRPC), flags from `EngineConfig`,
  `ServerConfig` and `WorkerConfig`; `baton serve sim`: many simulated workers in one
  process (services/sim; `SimConfig`, `SimTiming`, `SimFaults`); `baton serve encoder`: a
  vision-language model's encoder (services/encoder; `EncoderConfig`, docs/vision.md).
- `baton router`: the router (gRPC + OpenAI HTTP gateway), flags from `RouterConfig`.
- `baton up`: router + prefill + decode workers as local processes (`UpConfig` + engine flags), or
  with `--ray ADDRESS|auto` the workers as Ray actors (`RayConfig`, deploy/ray_launcher.py).
- `baton bench`: the online serving benchmark against any OpenAI-compatible server, flags
  from `bench.serving.config.BenchConfig`.
Engine flags (`--page-size`, `--chunked-prefill-size`, ...) are generated from
`EngineConfig`; sampling flags from a small subset of `SamplingParams`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Optional, Sequence

from baton.services.common.dataclass_flags import add_flags, from_args
from baton.services.engine.config import EngineConfig


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text offline with the in-process engine")
    p.add_argument("prompts", nargs="+", help="prompt text(s); each is one chat user message unless --raw")
    p.add_argument("--raw", action="store_true", help="send the prompt text as is (no chat template)")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="per-request seed for reproducible sampling")
    p.add_argument("--json-schema", default=None, help="constrain the output to this JSON schema (JSON text)")
    p.add_argument("--regex", default=None, help="constrain the output to this regular expression")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON line per result")
    add_flags(p, EngineConfig)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from baton.services.engine import LLM, SamplingParams, StructuredOutputParams
    structured = None
    if args.json_schema or args.regex:
        structured = StructuredOutputParams(json=args.json_schema, regex=args.regex)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, structured_output=structured)
    config = from_args(EngineConfig, args)
    llm = LLM(**{k: v for k, v in vars(config).items()})
    tok = llm.tokenizer
    prompts = []
    for text in args.prompts:
        if args.raw or not getattr(tok, "chat_template", None):
            prompts.append(text)
        else:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    for text, out in zip(args.prompts, llm.generate(prompts, params)):
        if out.error:
            print(f"error: {out.error}", file=sys.stderr)
            return 2
        completion = out.outputs[0]
        if args.as_json:
            print(json.dumps({"prompt": text, "text": completion.text, "token_ids": completion.token_ids,
                              "finish_reason": completion.finish_reason}))
        else:
            print(f"> {text}\n{completion.text}\n[{completion.finish_reason}, {len(completion.token_ids)} tokens]")
    return 0


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from baton.services.common.server import ServerConfig
    from baton.services.worker.worker_config import WorkerConfig
    from baton.services.sim.config import SimConfig, SimFaults, SimTiming
    p = sub.add_parser("serve", help="run one worker service (prefill or decode), or simulated workers (sim)")
    p.add_argument("role", choices=["prefill", "decode", "sim", "encoder"],
                   help="which service to run (sim: --sim-prefills / --sim-decodes simulated workers, no model)")
    add_flags(p, EngineConfig)
    add_flags(p, ServerConfig)
    add_flags(p, WorkerConfig)
    add_flags(p, SimConfig)
    add_flags(p, SimTiming)
    add_flags(p, SimFaults)
    from baton.services.encoder.encoder_config import EncoderConfig
    add_flags(p, EncoderConfig)  # encoder: the vision tower and embedding cache of a VLM folder
    p.set_defaults(func=_run_serve)


def worker_service(role: str):
    """The role package's service that `baton serve ROLE` runs (the worker shell imports none)."""
    if role == "prefill":
        from baton.services.prefill.servicer import SERVICE
    else:
        from baton.services.decode.servicer import SERVICE
    return SERVICE


def _run_serve(args: argparse.Namespace) -> int:
    from baton.services.common.server import ServerConfig
    if args.role == "sim":
        from baton.services.sim.cluster import run_sim
        from baton.services.sim.config import SimConfig, SimFaults, SimTiming
        return run_sim(from_args(SimConfig, args), from_args(SimTiming, args), from_args(SimFaults, args),
                       from_args(ServerConfig, args))
    from baton.services.worker.worker_config import WorkerConfig
    if args.role == "encoder":
        from baton.services.encoder.encoder_config import EncoderConfig
        from baton.services.encoder.servicer import run_encoder
        return run_encoder(from_args(EngineConfig, args), from_args(ServerConfig, args),
                           from_args(EncoderConfig, args), from_args(WorkerConfig, args))
    from baton.services.worker.worker_main import run_worker
    return run_worker(worker_service(args.role), from_args(EngineConfig, args), from_args(ServerConfig, args),
                      from_args(WorkerConfig, args))


def _router_parser(sub: argparse._SubParsersAction) -> None:
    from baton.router.config import RouterConfig
    p = sub.add_parser("router", help="run the router: gRPC API + OpenAI-compatible HTTP gateway")
    add_flags(p, RouterConfig)
    p.set_defaults(func=lambda args: __import__("baton.router.main", fromlist=["run_router"]).run_router(
        from_args(RouterConfig, args)))


def _up_parser(sub: argparse._SubParsersAction) -> None:
    from baton.deploy.launcher import UpConfig
    from baton.deploy.ray_launcher import RayConfig
    p = sub.add_parser("up", help="start router + prefill + decode workers on this machine (or on Ray: --ray)")
    add_flags(p, UpConfig)
    add_flags(p, RayConfig)
    add_flags(p, EngineConfig)
    p.set_defaults(func=_run_up)


def _run_up(args: argparse.Namespace) -> int:
    from baton.deploy.launcher import UpConfig, run_up
    from baton.deploy.ray_launcher import RayConfig
    return run_up(from_args(UpConfig, args), from_args(EngineConfig, args), from_args(RayConfig, args))


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from baton.bench.serving.config import BenchConfig
    p = sub.add_parser("bench", help="measure a running server: TTFT, ITL, TPOT, E2E, throughput, goodput",
                       description="Online serving benchmark through the OpenAI streaming API (see bench/serving).")
    add_flags(p, BenchConfig)
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from baton.bench.serving.config import BenchConfig
    from baton.bench.serving.runner import main as bench_main
    return bench_main(from_args(BenchConfig, args), command="baton " + shlex.join(args.cli_argv))


def build_parser() -> argparse.ArgumentParser:
    """The `baton` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _serve_parser(sub)
    _router_parser(sub)
    _up_parser(sub)
    _bench_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `baton` console script."""
    args = build_parser().parse_args(argv)
    args.cli_argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"baton: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
