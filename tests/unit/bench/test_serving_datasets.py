"""bench.serving.datasets: offline, seeded workloads of the requested shape, and the config."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from baton.bench.serving.config import BenchConfig
from baton.bench.serving.datasets import (SHAREGPT_INPUT_LOGNORMAL, SHAREGPT_OUTPUT_LOGNORMAL, WORDS, build_dataset,
                                    describe, messages_to_text, turn_messages, warmup_sessions)
from baton.deploy.cli import build_parser
from baton.services.common.dataclass_flags import from_args


def test_random_lengths_and_reproducibility():
    config = BenchConfig(dataset="random", num_prompts=50, input_len=40, output_len=12, range_ratio=0.5)
    a, b = build_dataset(config, seed=3), build_dataset(config, seed=3)
    assert a == b and a != build_dataset(config, seed=4)
    assert len(a) == 50 and all(s.num_turns == 1 and not s.system for s in a)
    assert all(20 <= s.input_lens[0] <= 40 and 6 <= s.output_lens[0] <= 12 for s in a)
    assert all(len(s.user_turns[0].split()) == s.input_lens[0] for s in a)
    fixed = build_dataset(BenchConfig(num_prompts=5, input_len=7, output_len=3), seed=0)
    assert {(s.input_lens[0], s.output_lens[0]) for s in fixed} == {(7, 3)}


def test_sharegpt_like_follows_the_lognormal_fit_and_the_filter():
    assert math.exp(SHAREGPT_INPUT_LOGNORMAL[0] + SHAREGPT_INPUT_LOGNORMAL[1] ** 2 / 2) == pytest.approx(161, rel=0.02)
    mu, sigma = SHAREGPT_OUTPUT_LOGNORMAL
    assert math.exp(mu + sigma ** 2 / 2) == pytest.approx(338, rel=0.02)
    sessions = build_dataset(BenchConfig(dataset="sharegpt-like", num_prompts=2000), seed=0)
    ins = np.array([s.input_lens[0] for s in sessions])
    outs = np.array([s.output_lens[0] for s in sessions])
    assert ins.min() >= 4 and outs.min() >= 4 and ins.max() <= 1024 and (ins + outs).max() <= 2048
    assert 100 < ins.mean() < 200 and 250 < outs.mean() < 380 and np.median(ins) < ins.mean()  # heavy tail
    fixed = build_dataset(BenchConfig(dataset="sharegpt-like", num_prompts=5, sharegpt_output_len=4,
                                      sharegpt_max_input_len=64), seed=0)
    assert all(s.output_lens == (4,) and s.input_lens[0] <= 64 for s in fixed)


def test_shared_prefix_groups():
    config = BenchConfig(dataset="shared-prefix", prefix_groups=3, prefix_len=20, questions_per_group=4,
                         input_len=5, output_len=2)
    sessions = build_dataset(config, seed=1)
    assert len(sessions) == 12 and [s.id for s in sessions] == list(range(12))
    by_group: dict[int, set[str]] = {}
    for s in sessions:
        by_group.setdefault(s.group, set()).add(s.system)
        assert len(s.system.split()) == 20 and s.input_lens == (25,)
    assert sorted(by_group) == [0, 1, 2] and all(len(v) == 1 for v in by_group.values())
    assert len({next(iter(v)) for v in by_group.values()}) == 3
    assert [s.group for s in sessions] != sorted(s.group for s in sessions)  # shuffled
    derived = build_dataset(BenchConfig(dataset="shared-prefix", prefix_groups=4, num_prompts=10), seed=0)
    assert len(derived) == 12  # Q = ceil(10 / 4)
    assert describe(sessions)["groups"] == 3


def test_multi_turn_history_resends_the_replies():
    sessions = build_dataset(BenchConfig(dataset="multi-turn", sessions=2, turns=3, input_len=4), seed=0)
    assert len(sessions) == 2 and all(s.num_turns == 3 for s in sessions)
    s = sessions[0]
    messages = turn_messages(s, 2, ["first reply", "second reply"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "first reply" and messages[-1]["content"] == s.user_turns[2]
    text = messages_to_text(messages)
    assert text.startswith("User: " + s.user_turns[0]) and text.endswith("Assistant:")
    assert messages_to_text([{"role": "user", "content": "plain"}]) == "plain"
    assert len(build_dataset(BenchConfig(dataset="multi-turn", num_prompts=7, turns=3), seed=0)) == 3
    assert describe(sessions)["requests"] == 6


def test_file_dataset(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hello there, how are you?"}, {"prompt": "Name a color.", "system": "Be brief.", "output_len": 3},
        {"turns": ["Hi", "And then?"], "max_tokens": 5}]) + "\n\n")
    sessions = build_dataset(BenchConfig(dataset="file", dataset_path=str(path), num_prompts=5, output_len=9), seed=0)
    assert [s.user_turns[0] for s in sessions] == ["Hello there, how are you?", "Name a color.", "Hi",
                                                   "Hello there, how are you?", "Name a color."]  # cycled
    assert sessions[0].output_lens == (9,) and sessions[1].output_lens == (3,) and sessions[1].system == "Be brief."
    assert sessions[2].user_turns == ("Hi", "And then?") and sessions[2].output_lens == (5, 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="prompt"):
        build_dataset(BenchConfig(dataset="file", dataset_path=str(bad)), seed=0)


def test_warmup_uses_other_prompts_of_the_same_shape():
    config = BenchConfig(dataset="multi-turn", sessions=2, turns=3, input_len=6, warmup=3)
    warm = warmup_sessions(config, seed=0)
    main = build_dataset(config, seed=0)
    assert len(warm) == 3 and all(s.num_turns == 1 and s.input_lens == (6,) for s in warm)
    assert not {s.user_turns[0] for s in warm} & {s.user_turns[0] for s in main}
    assert warmup_sessions(BenchConfig(), seed=0) == []


def test_words_are_single_tokens_for_the_embedded_model(default_model_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(default_model_path))
    assert all(len(tok.encode(" " + w, add_special_tokens=False)) == 1 for w in WORDS)
    session = build_dataset(BenchConfig(num_prompts=1, input_len=300), seed=0)[0]
    assert len(tok.encode(" " + session.user_turns[0], add_special_tokens=False)) == 300


def test_config_flags_and_validation():
    args = build_parser().parse_args(["bench", "--base-url", "http://h:1/v1", "--model", "m", "--request-rate", "inf",
                                      "--max-concurrency", "4", "--slo", "ttft=500, tpot=50", "--dataset",
                                      "shared-prefix", "--no-ignore-eos", "--sweep-rates", "1,2.5,inf"])
    config = from_args(BenchConfig, args)
    assert math.isinf(config.request_rate) and config.max_concurrency == 4 and not config.ignore_eos
    assert config.slos() == {"ttft": 500.0, "tpot": 50.0} and config.rates()[:2] == [1.0, 2.5]
    assert math.isinf(config.rates()[2]) and config.to_json()["request_rate"] == "inf"
    json.dumps(config.to_json(), allow_nan=False)
    assert BenchConfig(request_rate=3).rates() == [3.0]
    for bad in (dict(slo="ttft=fast"), dict(slo="latency=3"), dict(request_rate=0), dict(num_prompts=0),
                dict(dataset="file"), dict(sweep_rates="1,x"), dict(duration=5.0), dict(range_ratio=1.5)):
        with pytest.raises(ValueError):
            BenchConfig(**bad)
    BenchConfig(duration=5.0, max_concurrency=2)  # a closed loop is fine


def test_images_dataset_attaches_pngs_with_the_asked_repeat_share():
    import io

    from PIL import Image

    from baton.bench.serving.datasets import IMAGE_POOL, turn_messages
    config = BenchConfig(dataset="images", num_prompts=40, input_len=5, output_len=3, image_size=32,
                         images_per_request=2, image_repeat_share=0.5)
    sessions = build_dataset(config, seed=3)
    images = [image for s in sessions for image in s.images]
    assert len(images) == 80 and Image.open(io.BytesIO(images[0])).size == (32, 32)
    distinct = len(set(images))
    assert IMAGE_POOL < distinct < 80  # about half recur from the pool, the rest are new
    parts = turn_messages(sessions[0], 0, [])[-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert len({i for s in build_dataset(BenchConfig(dataset="images", num_prompts=10, image_size=8,
                                                     image_repeat_share=1.0), seed=0) for i in s.images}) <= IMAGE_POOL
    with pytest.raises(ValueError, match="endpoint chat"):
        BenchConfig(dataset="images", endpoint="completions")
