"""Vision-language figures of issue 12 on one GPU: a random LLaVA-1.5-7B-shaped model, the
encoder's throughput against its FLOP bound, and E/P/D vs colocated TTFT under image traffic.

Nothing is downloaded: the model (CLIP ViT-L/14-336 tower, two-layer MLP projector,
Llama-2-7B-shaped decoder, bf16, random weights made on the GPU) is built by `--make-model`
into a folder with its image processor and a word-level tokenizer (`t0`..`tN`, whose chat
template places the `<image>` word `t32000`), as `bench/gpu_engine.py --make-model` does for text.
Sections (`--sections`, in this order):

- encoder: images/s of the vision tower + projector (`ImageEncoder.vision`, Baton's own
  modules, bf16) on random pixels at each `--batches` size (CUDA-event medians after warm-ups),
  and of the whole path (PNG decode, the folder's image processor, tower) at the largest batch;
  against the FLOP bound (FLOPs per image from the tower's shape: patch embedding, the layers
  the feature layer needs, attention included, projector; / the GPU's dense bf16 peak, or
  `--peak-tflops`) and against the bf16 matmul rate measured in the same run (8192^3);
- epd: for each configuration (`epd`: `baton up --encoders 1 --prefills 1 --decodes 1
  --decode-only-threshold 0`; `colocated`: `--encoders 0 --prefills 0`, the decode worker runs
  the tower) on the one GPU (placement.py gives each of the three workers a third of
  --mem-fraction-static, the encoder included), `baton bench --dataset images` at each
  `--rates` (image requests/s; new images unless --repeat-share): TTFT p50 / p99, failed.

Every wait has a deadline (--ready-timeout-s, --bench-timeout-s, --budget-s for the whole run);
a configuration that fails or is skipped is a row with its error; the cluster is stopped
(SIGINT to its process group, then SIGTERM, SIGKILL). Results go to --out/gpu_vision.json
after each step; the tables print at the end. `--tiny` runs it all with a tiny random LLaVA
on the CPU (the plumbing check, under a minute).

    python3 -m baton.bench.gpu_vision --make-model /tmp/llava7b
    python3 -m baton.bench.gpu_vision --model /tmp/llava7b --out $OUT/vision
    python3 -m baton.bench.gpu_vision --tiny --out /tmp/vision-tiny
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
               text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
               image_token_id=32000, std=0.02),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             image_size=56, patch_size=14),
                 text=dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
                 image_token_id=383, std=0.2),
}
"""Model shapes: LLaVA-1.5-7B (CLIP ViT-L/14-336, Llama-2-7B) and the tiny CPU check."""

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}
"""Dense bf16 tensor-core peaks (no sparsity) by GPU name."""

CHAT_TEMPLATE = ("{% for m in messages %}{% if m.content is string %}{{ m.content }} {% else %}"
                 "{% for p in m.content %}{% if p.type == 'image' %}IMAGE {% else %}{{ p.text }} {% endif %}"
                 "{% endfor %}{% endif %}{% endfor %}")


# --- the model folder ---------------------------------------------------------------------
def make_model(out: str, shape: str = "7b", device: str = "cuda") -> dict[str, Any]:
    """A random-weight LLaVA-1.5 folder (weights made on `device`, bf16 on a GPU), with its
    CLIP image processor and a word-level tokenizer whose chat template places `<image>`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    s = SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**s["vision"], layer_norm_eps=1e-5),
        text_config=transformers.LlamaConfig(**s["text"], rms_norm_eps=1e-5, tie_word_embeddings=False,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_id=s["image_token_id"], projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
        image_seq_length=(s["vision"]["image_size"] // s["vision"]["patch_size"]) ** 2)
    t0 = time.time()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    try:
        with torch.device(device):
            torch.set_default_dtype(dtype)
            model = transformers.LlavaForConditionalGeneration(config)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0, s["std"])
    finally:
        torch.set_default_dtype(previous)
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.time()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    size = s["vision"]["image_size"]
    transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                                    ).save_pretrained(out)
    vocab = {f"t{i}": i for i in range(s["text"]["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                                eos_token="t2", pad_token="t0")
    fast.add_special_tokens({"additional_special_tokens": [f"t{s['image_token_id']}"]})  # never in bench prompts
    fast.chat_template = CHAT_TEMPLATE.replace("IMAGE", f"t{s['image_token_id']}")
    fast.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"params": n, "bytes": n * torch.empty((), dtype=dtype).element_size(),
            "init_s": round(t1 - t0, 1), "save_s": round(time.time() - t1, 1)}


# --- encoder throughput -------------------------------------------------------------------
def tower_flops(folder: str) -> float:
    """FLOPs of one image through the tower (the layers the feature layer needs) and projector."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    v, text_hidden = raw["vision_config"], raw["text_config"]["hidden_size"]
    d, f, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    patches = (v["image_size"] // p) ** 2
    t = patches + 1  # the class token
    feature = raw.get("vision_feature_layer", -2)
    layers = feature + v["num_hidden_layers"] + 1 if feature < 0 else feature
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 4 * t * t * d  # q,k,v,o + MLP; scores and values
    patch_embed = 2 * patches * 3 * p * p * d
    projector = 2 * patches * (d * text_hidden + text_hidden * text_hidden)
    return float(patch_embed + layers * per_layer + projector)


def median_ms(fn, device: str, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of `fn` (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def png(seed: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def section_encoder(folder: str, batches: list[int], device: str, peak_tflops: Optional[float]) -> dict:
    """Images/s of the tower + projector per batch size, against the FLOP bound and the matmul rate."""
    from baton.services.engine.multimodal.image_encoder import ImageEncoder
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 512
    m = torch.randn(n, n, dtype=dtype, device=device)
    matmul = 2 * n ** 3 / (median_ms(lambda: m @ m, device) / 1e3)
    del m
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    encoder = ImageEncoder(folder, device, dtype)
    vision = encoder.vision
    size = vision.vision_tower.image_size
    flops = tower_flops(folder)
    res: dict[str, Any] = {"gpu": name, "flops_per_image": flops, "matmul_flops": matmul,
                           "peak_flops": peak_tflops * 1e12 if peak_tflops else None, "batches": {}}
    for batch in batches:
        pixels = torch.randn(batch, 3, size, size, dtype=dtype, device=device)
        ms = median_ms(lambda: vision(pixels), device)
        rate = batch / (ms / 1e3)
        res["batches"][batch] = {"ms": round(ms, 3), "images_per_s": round(rate, 1),
                                 "of_matmul": round(rate * flops / matmul, 3),
                                 "of_peak": round(rate * flops / res["peak_flops"], 3) if res["peak_flops"] else None}
        del pixels
    big = max(batches)
    images = [png(i, size) for i in range(big)]
    t = time.perf_counter()
    encoder.encode([encoder.prepare(b) for b in images])
    res["with_preprocessing"] = {"batch": big, "images_per_s": round(big / (time.perf_counter() - t), 1)}
    res["bound_images_per_s"] = {"peak": round(res["peak_flops"] / flops, 1) if res["peak_flops"] else None,
                                 "matmul": round(matmul / flops, 1)}
    del encoder, vision
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the clusters of section epd get the memory back
    return res


# --- E/P/D vs colocated -------------------------------------------------------------------
CONFIGS = {"epd": ["--encoders", "1", "--prefills", "1", "--decodes", "1", "--decode-only-threshold", "0"],
           "colocated": ["--encoders", "0", "--prefills", "0"]}
"""`baton up` flags of each configuration (decode-only-threshold 0: every request disaggregates)."""


def up_command(folder: str, config: str, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "baton.deploy.cli", "up", "--model", folder, "--port", str(port),
            *CONFIGS[config], *extra]


def section_epd(args, folder: str, deadline: float) -> dict:
    """TTFT p50 / p99 and failures of each configuration at each rate (an error row where one fails)."""
    import subprocess

    from baton.bench.gpu_serving import stop_server, wait_ready
    from baton.bench.serving.config import BenchConfig
    from baton.bench.serving.runner import run_benchmark
    from baton.services.common.server import free_port
    out: dict[str, Any] = {}
    for config in args.configs.split(","):
        row: dict[str, Any] = {"error": None, "runs": []}
        out[config] = row
        left = deadline - time.monotonic()
        if left < 60:
            row["error"] = f"skipped: {left:.0f} s of the budget left"
            continue
        port = free_port("127.0.0.1")
        command = up_command(folder, config, port, args.up_flag)
        row["command"] = " ".join(command[1:])
        log_path = Path(args.out) / f"up-{config}.log"
        base = f"http://127.0.0.1:{port}"
        print(f"gpu_vision: starting {config}: {row['command']}", file=sys.stderr, flush=True)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                row["ready_s"] = round(wait_ready(base, proc, min(args.ready_timeout_s, left - 30)), 1)
                bench = BenchConfig(base_url=base, dataset="images", tokenizer=folder, seed=0, warmup=2,
                                    num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                                    image_size=args.image_size, images_per_request=1,
                                    image_repeat_share=args.repeat_share, max_concurrency=args.max_concurrency,
                                    sweep_rates=args.rates, request_timeout=args.request_timeout_s)
                timeout = max(10.0, min(args.bench_timeout_s, deadline - time.monotonic() - 20))
                doc = asyncio.run(asyncio.wait_for(run_benchmark(bench, command=f"gpu_vision {config}"), timeout))
                for run in doc["runs"]:
                    row["runs"].append({"rate": run["request_rate"], "ttft_p50": run["ttft_ms"]["median"],
                                        "ttft_p99": run["ttft_ms"]["p99"], "completed": run["completed"],
                                        "failed": run["failed"], "errors": run["errors"],
                                        "request_throughput": run["request_throughput"]})
            except (Exception, asyncio.TimeoutError) as error:  # noqa: BLE001 - a row, the next config runs
                row["error"] = f"{type(error).__name__}: {error}"
            finally:
                row["stop"] = stop_server(proc, 20.0)
        if row["error"]:
            row["log_tail"] = log_path.read_text(errors="replace")[-2000:]
    return out


# --- report -------------------------------------------------------------------------------
def tables(res: dict) -> str:
    lines = []
    enc = res.get("encoder")
    if isinstance(enc, dict) and "batches" in enc:
        lines += [f"encoder ({enc['gpu']}): {enc['flops_per_image'] / 1e9:.4g} GFLOP/image; bound "
                  f"{enc['bound_images_per_s']['peak']} img/s at peak, {enc['bound_images_per_s']['matmul']} img/s at "
                  f"the measured matmul rate ({enc['matmul_flops'] / 1e12:.4g} TFLOP/s)",
                  "| batch | ms | images/s | of matmul rate | of peak |", "|---|---|---|---|---|"]
        for batch, b in enc["batches"].items():
            lines.append(f"| {batch} | {b['ms']} | {b['images_per_s']} | {b['of_matmul']} | {b['of_peak']} |")
        w = enc["with_preprocessing"]
        lines.append(f"with PNG decode + image processor, batch {w['batch']}: {w['images_per_s']} images/s")
    elif enc:
        lines.append(f"encoder: {enc}")
    epd = res.get("epd") or {}
    if epd:
        lines += ["", "| config | image req/s | TTFT p50 ms | TTFT p99 ms | completed | failed |",
                  "|---|---|---|---|---|---|"]
        fmt = (lambda v: "-" if v is None else f"{v:.1f}")
        for config, row in epd.items():
            for run in row.get("runs", []):
                lines.append(f"| {config} | {run['rate']} | {fmt(run['ttft_p50'])} | {fmt(run['ttft_p99'])} | "
                             f"{run['completed']} | {run['failed']} |")
            if row.get("error"):
                lines.append(f"| {config} | - | - | - | - | {row['error'][:120]} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-model", default="", help="build the random LLaVA-1.5-7B folder here (if missing) and exit")
    p.add_argument("--model", default="", help="the model folder (built if missing)")
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaVA on the CPU (plumbing check)")
    p.add_argument("--sections", default="encoder,epd")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    p.add_argument("--configs", default="epd,colocated")
    p.add_argument("--rates", default="1,2,4", help="image requests/s")
    p.add_argument("--num-prompts", type=int, default=0, help="requests per rate (default 40; tiny 4)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--image-size", type=int, default=0, help="synthetic image side (default: the tower's)")
    p.add_argument("--repeat-share", type=float, default=0.0, help="share of repeated images (cache hits)")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--up-flag", action="append", default=[], help="extra `baton up` flag (repeat; --up-flag=--x)")
    p.add_argument("--ready-timeout-s", type=float, default=300.0)
    p.add_argument("--bench-timeout-s", type=float, default=240.0)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--budget-s", type=float, default=540.0, help="deadline of the whole run (one device command)")
    p.add_argument("--out", default=os.environ.get("OUT", "") or "bench/results/gpu_vision")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    device = "cpu" if args.tiny else "cuda"
    shape = "tiny" if args.tiny else "7b"
    if args.make_model:
        if not (Path(args.make_model) / "config.json").exists():
            print(json.dumps(make_model(args.make_model, shape, device)), flush=True)
        return 0
    folder = args.model or (str(Path(tempfile.gettempdir()) / "baton-vision-tiny") if args.tiny else "")
    if not folder:
        print("gpu_vision: give --model DIR (built there if missing) or --tiny", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(sys.argv), "model": folder, "shape": shape}
    if not (Path(folder) / "config.json").exists():
        res["make_model"] = make_model(folder, shape, device)
    args.num_prompts = args.num_prompts or (4 if args.tiny else 40)
    args.image_size = args.image_size or SHAPES[shape]["vision"]["image_size"]
    if args.tiny:
        args.up_flag = ["--device", "cpu", *args.up_flag]
        args.ready_timeout_s = min(args.ready_timeout_s, 120.0)

    def save() -> None:
        (Path(args.out) / "gpu_vision.json").write_text(json.dumps(res, indent=1, default=str))
    sections = args.sections.split(",")
    try:
        if "encoder" in sections:
            try:
                res["encoder"] = section_encoder(folder, [int(b) for b in args.batches.split(",")], device,
                                                 args.peak_tflops)
            except Exception as error:  # noqa: BLE001 - the table says so; epd still runs
                res["encoder"] = {"error": f"{type(error).__name__}: {error}"}
            save()
        if "epd" in sections:
            res["epd"] = section_epd(args, folder, deadline)
            save()
    finally:
        save()
        print(tables(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
