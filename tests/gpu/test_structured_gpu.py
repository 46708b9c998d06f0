"""Structured output on the GPU: xgrammar's bitmask applied to CUDA logits inside the GPU
sampler. A tiny random-weight Llama with a byte-level BPE tokenizer (so any text can be
spelled) must produce output that satisfies a JSON schema, a regex and an EBNF grammar,
greedy and sampled, in one mixed batch with unconstrained requests; every block returns.
Skipped when xgrammar is not installed (carry its wheel to the GPU machine)."""
import json
import re

import pytest
import torch

pytest.importorskip("xgrammar")

from baton.services.engine import LLM, SamplingParams, StructuredOutputParams  # noqa: E402
from tests.helpers.tiny_models import make_tiny_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "n"], "additionalProperties": False}
REGEX = r"[a-c]{3}-\d{2}"
EBNF = 'root ::= "(" ("yes" | "no") ")"'


def byte_level_model(folder, device_name):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    corpus = ['{"color": "red", "n": 12}', "abc-12 bca-34", "(yes) (no)", "hello world"] * 20
    bpe.train_from_iterator(corpus, vocab_size=320, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    make_tiny_model("llama", folder, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    tokenizer.save_pretrained(folder)
    return folder


def run_structured(folder, device):
    llm = LLM(model=str(folder), device=device, dtype="float32", page_size=16, kv_cache_tokens=4096)
    prompt = llm.tokenizer.encode("hello world")
    specs = [StructuredOutputParams(json=json.dumps(SCHEMA)), StructuredOutputParams(regex=REGEX),
             StructuredOutputParams(grammar=EBNF), StructuredOutputParams(json_object=True)]
    params = []
    for seed in range(3):
        for spec in specs:
            params.append(SamplingParams(temperature=0.0 if seed == 0 else 1.0, seed=seed, max_tokens=200,
                                         structured_output=spec))
    params.append(SamplingParams(temperature=1.0, seed=9, max_tokens=8, ignore_eos=True))  # unconstrained
    outputs = llm.generate([prompt] * len(params), params)
    for p, out in zip(params, outputs):
        completion = out.outputs[0]
        spec = p.structured_output
        if spec is None:
            assert len(completion.token_ids) == 8
            continue
        text = completion.text
        if spec.json is not None:
            value = json.loads(text)
            assert set(value) == {"color", "n"} and value["color"] in ("red", "green", "blue")
            assert isinstance(value["n"], int) and 0 <= value["n"] <= 99
        elif spec.regex is not None:
            assert re.fullmatch(REGEX, text), text
        elif spec.grammar is not None:
            assert text in ("(yes)", "(no)"), text
        elif completion.finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
    llm.engine.check_idle_integrity()


def test_grammar_masks_on_cuda_logits(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run_structured(byte_level_model(tmp_path / "bytes", "cuda"), "cuda")
