"""The frontend language (SGLang's): programs that build prompts step by step against a cluster.

    import baton

    @baton.function
    def classify(s, review):
        s += baton.user("Review: " + review + "\\nPositive or negative?")
        s += baton.assistant(baton.select("label", choices=["positive", "negative"]))

    baton.set_default_backend(baton.RuntimeEndpoint("http://localhost:8000"))
    print(classify.run(review="Great food.")["label"])

Modules: `ir` (the expressions: gen, select, roles, image), `state` (`ProgramState`, forks,
role blocks), `runner` (a state's steps in order, in the background), `interpreter` (what each
expression does to the prompt), `program` (`function`, `run`, `run_batch`), `backend` (the
backend interface, the default backend), `runtime_endpoint` (`RuntimeEndpoint` over a Baton
gateway), `errors`. docs/lang.md is the guide.
"""
from baton.lang.backend import Backend, get_default_backend, reset_default_backend, set_default_backend
from baton.lang.errors import BackendError, ProgramError, UsageError
from baton.lang.ir import assistant, gen, image, select, system, user
from baton.lang.program import Program, function
from baton.lang.runtime_endpoint import RuntimeEndpoint
from baton.lang.state import ForkGroup, ProgramState

__all__ = ["Backend", "BackendError", "ForkGroup", "Program", "ProgramError", "ProgramState", "RuntimeEndpoint",
           "UsageError", "assistant", "function", "gen", "get_default_backend", "image", "reset_default_backend",
           "select", "set_default_backend", "system", "user"]
