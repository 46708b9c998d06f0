"""Images end to end: `baton up --model VLM --encoders 2 --prefills 1 --decodes 1` and the official
openai client with base64 images (a tiny random-weight LLaVA-1.5 on CPU, every process real).

- E/P/D output equals transformers' and the colocated baseline (the decode worker running
  its own tower: no encoder, no prefill), token for token; usage counts the image tokens;
- the same image twice: the vision tower runs once (encoder metrics), prefill and decode never;
- two different images behind the same text: different outputs, no shared KV past the image;
- bad images are 400s;
- an encoder killed: the request is retried on the other and completes; with none left the
  error is clear and fast.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from baton.protos.baton.v1 import worker_pb2, worker_pb2_grpc
from baton.protos.cluster_auth import ClusterCredentials, open_channel, read_secret_file
from baton.services.common.server import free_port
from baton.services.engine.multimodal.image_encoder import ImageEncoder, decode_image
from baton.services.engine.sampling_params import SamplingParams
from baton.services.worker.params_codec import sampling_params_to_proto
from tests.helpers.tiny_models import IMAGE_TOKEN, hf_vlm_greedy, load_hf_vlm, make_tiny_vlm, tiny_image
from tests.helpers.workers import REPO

MAX_NEW = 8
IMG = f"w{IMAGE_TOKEN['llava']}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running E/P/D cluster: (openai client, folder, hf model, encoder, targets, pids, secret, media dir)."""
    tmp = tmp_path_factory.mktemp("vlm_up")
    folder = make_tiny_vlm("llava", tmp / "llava")
    media = tmp / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(tiny_image(40))
    port, targets, log_path = free_port(), tmp / "targets.json", tmp / "up.log"
    secret = tmp / "cluster.secret"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o600)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    # a slow health interval and no restarts: a killed encoder stays dead and the router keeps
    # ranking it first for a while, so the workers' own retry is what the kill test sees
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.deploy.cli", "up", "--model", str(folder), "--encoders", "2", "--prefills", "1",
         "--decodes", "1", "--port", str(port), "--decode-only-threshold", "0", "--page-size", "4",
         "--kv-cache-tokens", "4096", "--prometheus-targets", str(targets), "--cluster-secret-file", str(secret),
         "--health-interval-s", "5", "--restart-backoff-s", "600", "--restart-backoff-max-s", "600", "--allowed-local-media-path", str(media)],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 240
    while "Baton is up" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.2)
    pids = {m.group(1): int(m.group(2)) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", log_path.read_text())}
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield dict(client=client, folder=folder, hf=load_hf_vlm(folder), encoder=ImageEncoder(folder),
               targets=json.loads(targets.read_text()), pids=pids, secret=str(secret), media=media, log=log_path)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def chat(c, before: str, image_url: str, after: str = "w20 w21", **kwargs):
    return c["client"].chat.completions.create(
        model=c["folder"].name, temperature=0, max_tokens=MAX_NEW, extra_body={"ignore_eos": True}, **kwargs,
        messages=[{"role": "user", "content": [{"type": "text", "text": before},
                                                {"type": "image_url", "image_url": {"url": image_url}},
                                                {"type": "text", "text": after}]}])


def expected(c, before: str, image: bytes, after: str = "w20 w21") -> tuple[list[int], list[int]]:
    """(expanded prompt, transformers' greedy tokens) for the chat above (the template joins parts with spaces)."""
    encoder = c["encoder"]
    prompt = _tokenizer(c).encode(f"{before} {IMG} {after} ", add_special_tokens=False)
    expanded, _ = encoder.spans(prompt, [encoder.prepare(image)])
    return expanded, hf_vlm_greedy(c["hf"], expanded, [decode_image(image)], MAX_NEW)


def text_of(c, tokens: list[int]) -> str:
    """What the stream of `tokens` reads as (the word tokenizer's words, spaces normalised)."""
    return " ".join(_tokenizer(c).decode(tokens).split())


def content(reply) -> str:
    return " ".join(reply.choices[0].message.content.split())


def _tokenizer(c):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(c["folder"]))


def metric(c, component: str, name: str, index: int = 0, **labels) -> float:
    target = [t for t in c["targets"] if t["labels"]["component"] == component][index]
    with urllib.request.urlopen(f"http://{target['targets'][0]}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()))


def encoders_total(c, name: str) -> float:
    return sum(metric(c, "encoder", name, i) for i in range(2))


def direct(c, prompt: list[int], image: bytes, encoders: list[str]) -> list[int]:
    """The decode worker alone (no prefill), with these encoders (none: its own tower, the colocated baseline)."""
    decode = next(t["labels"]["worker"] for t in c["targets"] if t["labels"]["component"] == "decode")

    async def run() -> list[int]:
        credentials = ClusterCredentials(secret=read_secret_file(c["secret"]))
        async with open_channel(decode, credentials) as channel:
            request = worker_pb2.DecodeRequest(
                prompt_token_ids=prompt, images=[worker_pb2.ImageInput(data=image)], encoder_addresses=encoders,
                params=sampling_params_to_proto(SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)))
            return [t async for chunk in worker_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60)
                    for t in chunk.token_ids]
    return asyncio.run(run())


def encoder_addresses(c) -> list[tuple[str, str]]:
    """(gRPC address, process name) of each encoder, in the order min_load ranks idle ones (by address)."""
    found = [(t["labels"]["worker"], f"encoder-{i}")
             for i, t in enumerate(t for t in c["targets"] if t["labels"]["component"] == "encoder")]
    return sorted(found)


def test_epd_equals_transformers_and_colocated(cluster):
    image = tiny_image(1, 56, 84)
    reply = chat(cluster, "w10 w11 w12 w13", data_url(image))
    expanded, want = expected(cluster, "w10 w11 w12 w13", image)
    assert content(reply) == text_of(cluster, want)
    assert reply.usage.prompt_tokens == len(expanded) == 6 + 16  # the image's 16 tokens are counted
    assert metric(cluster, "prefill", "baton_worker_images_encoded_locally_total") == 0
    assert metric(cluster, "decode", "baton_worker_images_encoded_locally_total") == 0
    unexpanded = _tokenizer(cluster).encode(f"w10 w11 w12 w13 {IMG} w20 w21 ", add_special_tokens=False)
    assert direct(cluster, unexpanded, image, []) == want
    assert metric(cluster, "decode", "baton_worker_images_encoded_locally_total") == 1


def test_same_image_twice_runs_the_tower_once(cluster):
    image = tiny_image(2)
    tower, hits = encoders_total(cluster, "baton_encoder_tower_images_total"), \
        encoders_total(cluster, "baton_encoder_embedding_cache_hits_total")
    first = chat(cluster, "w30 w31", data_url(image)).choices[0].message.content
    second = chat(cluster, "w40 w41 w42", data_url(image)).choices[0].message.content
    assert encoders_total(cluster, "baton_encoder_tower_images_total") - tower == 1
    assert encoders_total(cluster, "baton_encoder_embedding_cache_hits_total") - hits >= 2
    assert first and second
    assert metric(cluster, "prefill", "baton_worker_images_encoded_locally_total") == 0


def test_different_images_behind_the_same_text_share_no_blocks_past_it(cluster):
    text = "w50 w51 w52 w53"  # exactly one page before the image
    a, b = tiny_image(3), tiny_image(4)
    first, other, again = (chat(cluster, text, data_url(i)) for i in (a, b, a))
    assert other.choices[0].message.content != first.choices[0].message.content
    assert other.usage.prompt_tokens_details.cached_tokens <= 4
    assert again.usage.prompt_tokens_details.cached_tokens > 4 + 16 - 4
    assert again.choices[0].message.content == first.choices[0].message.content
    assert content(first) == text_of(cluster, expected(cluster, text, a)[1])


def test_local_files_under_the_allowed_path(cluster):
    reply = chat(cluster, "w60", f"file://{cluster['media']}/cat.png")
    assert content(reply) == text_of(cluster, expected(cluster, "w60", (cluster["media"] / "cat.png").read_bytes())[1])


@pytest.mark.parametrize("url, needle", [
    ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), "cannot be decoded"),
    ("file:///etc/passwd", "allowed media path"),
    ("http://images.invalid/cat.png", "could not be fetched"),
])
def test_bad_images_are_400(cluster, url, needle):
    with pytest.raises(openai.BadRequestError) as info:
        chat(cluster, "w70", url)
    assert needle in info.value.message


def test_too_many_images_is_400(cluster):
    parts = [{"type": "image_url", "image_url": {"url": data_url(tiny_image(5))}}] * 9
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        cluster["client"].chat.completions.create(model=cluster["folder"].name, max_tokens=2,
                                                  messages=[{"role": "user", "content": parts}])


def test_killed_encoder_is_retried_then_none_left_is_a_clear_error(cluster):
    """Runs last: it kills both encoders (the cluster does not restart them)."""
    (dead, first), (alive, second) = encoder_addresses(cluster)
    image = tiny_image(6)
    prompt = _tokenizer(cluster).encode(f"w80 w81 {IMG} w20 w21 ", add_special_tokens=False)
    want = expected(cluster, "w80 w81", image)[1]
    os.kill(cluster["pids"][first], signal.SIGKILL)
    failed = metric(cluster, "decode", "baton_worker_image_fetches_total", outcome="failed")
    assert direct(cluster, prompt, image, [dead, alive]) == want  # the worker moves on to the next encoder
    assert metric(cluster, "decode", "baton_worker_image_fetches_total", outcome="failed") == failed + 1
    reply = chat(cluster, "w80 w81", data_url(image))  # through the router: completes on the live encoder
    assert content(reply) == text_of(cluster, want)
    os.kill(cluster["pids"][second], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        chat(cluster, "w90", data_url(tiny_image(7)))
    assert time.monotonic() - started < 10
    assert info.value.status_code == 503 and "encoder" in info.value.message
