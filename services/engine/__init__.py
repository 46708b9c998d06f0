"""The inference engine: paged KV cache, radix prefix cache, continuous batching, sampling,
structured output. No gRPC and no asyncio: usable as a library.

    from baton.services.engine import LLM, SamplingParams
    llm = LLM(model="/path/to/hf-folder", chunked_prefill_size=512)
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""
from baton.services.engine.config import EngineConfig
from baton.services.engine.llm import LLM
from baton.services.engine.request import CompletionOutput, RequestOutput
from baton.services.engine.sampling_params import SamplingParams, StructuredOutputParams

__all__ = ["LLM", "EngineConfig", "SamplingParams", "StructuredOutputParams", "RequestOutput", "CompletionOutput"]
