"""Workloads for `baton bench`, generated offline and reproducible from a seed.

A workload is a list of `Session`s: an optional system prompt and one or more user turns
sent in order (a later turn resends the history with the server's actual replies). Text
comes from a prompt maker: `tokenizer.TokenPrompts` (the served model's tokenizer: every
text exactly its number of tokens, each starting with its own number so prompts share no
prefix unless the dataset means them to) or, without a tokenizer, `WordPrompts`: common
English words that are one token each (with their leading space) in GPT-2-style BPE
vocabularies such as SmolLM2's and Llama 3's, so N words are about N tokens. Lengths count
the text only (the chat template adds its own tokens).

- `random`: one turn, input / output lengths uniform in [len * range_ratio, len] (or from
  --input-len-min / --output-len-min).
- `sharegpt-like`: one turn, lengths from log-normal fits of ShareGPT's length statistics
  (means of about 161 prompt and 338 output tokens, as the vLLM paper reports), filtered as
  vLLM's ShareGPT sampler does (>= 4 tokens each, prompt <= max, prompt + output <= 2048).
- `shared-prefix`: G groups, each a P-token system prompt, Q questions per group, shuffled
  (the case RadixAttention's prefix cache is for).
- `multi-turn`: sessions of T user turns that each resend the growing history.
- `images`: one turn of random text with `images_per_request` synthetic PNGs of
  `image_size` pixels (random noise, so each is its own image); a share `image_repeat_share`
  of them is drawn from a pool of 8 images that recur (the encoder's embedding-cache hits).
- `file`: a JSONL the user brings: {"prompt": str, "system"?: str, "output_len"?: int} or
  {"turns": [str, ...], ...} per line; cycled when it has fewer lines than --num-prompts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from baton.bench.serving.config import BenchConfig

WORDS = tuple("""
the of and to in is that for it as was with be by on not he this are or his from at which but have an they
you were her she there one all we their has been if more when will would who so no time people year way day
man thing woman life child world school state family student group country problem hand part place case week
company system program question work government number night point home water room mother area money story
fact month lot right study book eye job word business issue side kind head house service friend father power
hour game line end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy process music market sense nation
plan college interest death experience effect use class control care field development role effort rate
heart drug show leader light voice wife police mind price report decision son view relationship town road
arm difference value building action model season society tax director position player record paper space
ground form event official matter center couple site project activity star table need court oil situation
cost industry figure street image phone data picture practice piece land product doctor wall patient worker
news test movie north love support technology step baby computer type attention film tree source
organization hair window evidence population truth song river garden ocean mountain forest summer winter
spring autumn bread apple stone glass letter color green blue red black white small large long short early
late young old good great high low new free strong clear simple open happy quick slow warm cold bright dark
soft hard heavy""".split())

# Log-normal fits (natural-log mean and sigma) of ShareGPT prompt and output lengths in tokens:
# exp(mu + sigma^2 / 2) gives means of about 161 and 338 tokens.
SHAREGPT_INPUT_LOGNORMAL = (4.58, 1.0)
SHAREGPT_OUTPUT_LOGNORMAL = (5.50, 0.8)
SHAREGPT_MAX_TOTAL = 2048
SHAREGPT_MIN_LEN = 4


@dataclass(frozen=True)
class Session:
    """One unit of work: an optional system prompt and user turns sent one after another."""

    id: int
    user_turns: tuple[str, ...]
    """The user messages, in order."""
    input_lens: tuple[int, ...]
    """Tokens each turn adds, exact with a tokenizer (the system prompt counts in the first)."""
    output_lens: tuple[int, ...]
    """max_tokens of each turn."""
    system: str = ""
    group: Optional[int] = None
    """shared-prefix: the group whose system prompt this session uses."""
    images: tuple[bytes, ...] = ()
    """images: PNG files attached to the (first) user turn, as image_url parts."""

    @property
    def num_turns(self) -> int:
        return len(self.user_turns)

    def first_turn_only(self) -> "Session":
        return replace(self, user_turns=self.user_turns[:1], input_lens=self.input_lens[:1],
                       output_lens=self.output_lens[:1])


def words(rng: np.random.Generator, n: int) -> str:
    """`n` words drawn from WORDS: about `n` tokens."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=max(0, n)))


class WordPrompts:
    """The prompt maker without a tokenizer: `n` words from WORDS count as `n` tokens."""

    source = "words"

    def bind(self, rng: np.random.Generator) -> Callable[[int], tuple[str, int]]:
        return lambda n: (words(rng, n), max(0, n))

    def count(self, text: str) -> int:
        return estimate_tokens(text)


def estimate_tokens(text: str) -> int:
    """A rough token count for text that was not built from WORDS (about 4 characters a token)."""
    return max(1, round(len(text) / 4))


def turn_messages(session: Session, turn: int, replies: list[str]) -> list[dict[str, str]]:
    """The chat messages of `turn`: system, then each earlier turn and its reply, then this turn."""
    messages = [{"role": "system", "content": session.system}] if session.system else []
    for i in range(turn):
        messages += [{"role": "user", "content": session.user_turns[i]},
                     {"role": "assistant", "content": replies[i] if i < len(replies) else ""}]
    if session.images and turn == 0:
        messages.append({"role": "user", "content": [{"type": "text", "text": session.user_turns[0]}] + [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in session.images]})
        return messages
    messages.append({"role": "user", "content": session.user_turns[turn]})
    return messages


def messages_to_text(messages: list[dict[str, str]]) -> str:
    """The prompt for /v1/completions: a lone user message as is, else a plain transcript."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    parts = []
    for m in messages:
        parts.append(m["content"] if m["role"] == "system" else f"{m['role'].capitalize()}: {m['content']}")
    return "\n\n".join(parts) + "\n\nAssistant:"


def _uniform_lens(rng: np.random.Generator, length: int, ratio: float, n: int,
                  low: Optional[int] = None) -> np.ndarray:
    return rng.integers(low if low is not None else max(1, int(length * ratio)), length + 1, size=n)


def random_dataset(config: BenchConfig, rng: np.random.Generator, prompts: Any) -> list[Session]:
    n = config.num_prompts
    ins = _uniform_lens(rng, config.input_len, config.range_ratio, n, config.input_len_min)
    outs = _uniform_lens(rng, config.output_len, config.range_ratio, n, config.output_len_min)
    make = prompts.bind(rng)
    texts = [make(int(ins[i])) for i in range(n)]
    return [Session(i, (texts[i][0],), (texts[i][1],), (int(outs[i]),)) for i in range(n)]


def sharegpt_like_dataset(config: BenchConfig, rng: np.random.Generator, prompts: Any) -> list[Session]:
    sessions = []
    make = prompts.bind(rng)
    while len(sessions) < config.num_prompts:
        n_in = int(round(rng.lognormal(*SHAREGPT_INPUT_LOGNORMAL)))
        n_out = int(round(rng.lognormal(*SHAREGPT_OUTPUT_LOGNORMAL)))
        if (n_in < SHAREGPT_MIN_LEN or n_out < SHAREGPT_MIN_LEN or n_in > config.sharegpt_max_input_len
                or n_in + n_out > SHAREGPT_MAX_TOTAL):
            continue
        if config.sharegpt_output_len is not None:
            n_out = config.sharegpt_output_len
        text, tokens = make(n_in)
        sessions.append(Session(len(sessions), (text,), (tokens,), (n_out,)))
    return sessions


def shared_prefix_dataset(config: BenchConfig, rng: np.random.Generator, prompts: Any) -> list[Session]:
    groups = config.prefix_groups
    per_group = config.questions_per_group or math.ceil(config.num_prompts / groups)
    make = prompts.bind(rng)
    systems = [make(config.prefix_len) for _ in range(groups)]
    sessions = []
    for g in range(groups):
        for _ in range(per_group):
            text, tokens = make(config.input_len)
            sessions.append(Session(0, (text,), (systems[g][1] + tokens,), (config.output_len,),
                                    system=systems[g][0], group=g))
    order = rng.permutation(len(sessions))
    return [replace(sessions[j], id=i) for i, j in enumerate(order)]


def multi_turn_dataset(config: BenchConfig, rng: np.random.Generator, prompts: Any) -> list[Session]:
    count = config.sessions or math.ceil(config.num_prompts / config.turns)
    make = prompts.bind(rng)
    sessions = []
    for i in range(count):
        turns = [make(config.input_len) for _ in range(config.turns)]
        sessions.append(Session(i, tuple(t for t, _ in turns), tuple(n for _, n in turns),
                                (config.output_len,) * config.turns))
    return sessions


def file_dataset(config: BenchConfig, rng: np.random.Generator, prompts: Any) -> list[Session]:
    path = Path(config.dataset_path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if turns is None and isinstance(row, dict) and isinstance(row.get("prompt"), str):
            turns = [row["prompt"]]
        if not turns or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(f'{path}:{number}: needs "prompt" (a string) or "turns" (a list of strings)')
        system = str(row.get("system") or "")
        out = int(row.get("output_len") or row.get("max_tokens") or config.output_len)
        lens = [prompts.count(t) for t in turns]
        lens[0] += prompts.count(system) if system else 0
        rows.append((tuple(turns), tuple(lens), (out,) * len(turns), system))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return [Session(i, *rows[i % len(rows)][:3], system=rows[i % len(rows)][3]) for i in range(config.num_prompts)]


IMAGE_POOL = 8
"""images: how many distinct images the repeated share is drawn from."""


def synthetic_png(rng: np.random.Generator, size: int) -> bytes:
    """A size x size PNG of random noise."""
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_url(image: bytes) -> str:
    """An image_url part's data URL for PNG bytes."""
    import base64
    return "data:image/png;base64," + base64.b64encode(image).decode()


def images_dataset(config: BenchConfig, rng: np.random.Generator, prompts: Any) -> list[Session]:
    make = prompts.bind(rng)
    pool = [synthetic_png(rng, config.image_size) for _ in range(IMAGE_POOL)]
    sessions = []
    for i in range(config.num_prompts):
        text, n = make(config.input_len)
        images = tuple(pool[int(rng.integers(0, IMAGE_POOL))] if rng.random() < config.image_repeat_share
                       else synthetic_png(rng, config.image_size) for _ in range(config.images_per_request))
        sessions.append(Session(i, (text,), (n,), (config.output_len,), images=images))
    return sessions


_BUILDERS = {"random": random_dataset, "sharegpt-like": sharegpt_like_dataset,
             "shared-prefix": shared_prefix_dataset, "multi-turn": multi_turn_dataset, "file": file_dataset,
             "images": images_dataset}


def build_dataset(config: BenchConfig, seed: int, warmup: bool = False, prompts: Any = None) -> list[Session]:
    """The sessions of `config.dataset` for `seed`; warmup=True draws a separate stream of the same shape.
    `prompts` makes the text (`tokenizer.TokenPrompts`; default `WordPrompts`)."""
    rng = np.random.default_rng([seed, 1 if warmup else 0])
    return _BUILDERS[config.dataset](config, rng, prompts if prompts is not None else WordPrompts())


def warmup_sessions(config: BenchConfig, seed: int, prompts: Any = None) -> list[Session]:
    """`config.warmup` single-turn sessions (separate prompts) to send before measuring."""
    if config.warmup == 0:
        return []
    pool = build_dataset(config, seed, warmup=True, prompts=prompts)
    return [pool[i % len(pool)].first_turn_only() for i in range(config.warmup)]


def describe(sessions: list[Session], prompts: str = "words") -> dict:
    """Shape of a workload for the report: sessions, requests, lengths, how the text was made."""
    ins = [n for s in sessions for n in s.input_lens]
    outs = [n for s in sessions for n in s.output_lens]
    return {"sessions": len(sessions), "requests": len(ins),
            "input_len_mean": float(np.mean(ins)) if ins else 0.0,
            "output_len_mean": float(np.mean(outs)) if outs else 0.0,
            "groups": len({s.group for s in sessions if s.group is not None}), "prompts": prompts,
            "images": sum(len(s.images) for s in sessions),
            "distinct_images": len({image for s in sessions for image in s.images})}
