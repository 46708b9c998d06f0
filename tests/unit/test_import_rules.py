"""Who may import whom, for the whole tree (docs/architecture.md, "Who may import whom"):

- `router` never imports `services` (they meet only on the wire);
- the engine imports neither `protos` nor `transfer` (nor anything above it);
- `transfer` never imports the engine;
- nothing imports upwards into a role package (prefill / decode / encoder / sim): only the
  CLI (`deploy`) picks a role;
- the simulated workers (`services/sim`) import no engine (no torch), transfer, router or
  other role: they speak the protocol with a timing model;
- `services/common` knows no engine, worker or transfer;
- the frontend language (`baton/lang`) is a client: it meets the cluster only over HTTP and
  imports no other baton package (so `import baton.lang` never pulls in torch or grpc);
- between packages there is no cycle: the package graph is a DAG.

Read from the syntax trees (lazy imports inside functions count too); `bench` and `tests`
are users of the packages and are not checked.
"""
from __future__ import annotations

from graphlib import CycleError, TopologicalSorter

import pytest

from tests.helpers.imports import baton_imports, package_imports

PACKAGES = {
    "baton.protos": "protos", "baton.router": "router", "baton.deploy": "deploy",
    "baton.services.common": "services/common", "baton.services.engine": "services/engine",
    "baton.services.transfer": "services/transfer", "baton.services.worker": "services/worker",
    "baton.services.prefill": "services/prefill", "baton.services.decode": "services/decode",
    "baton.services.encoder": "services/encoder", "baton.lang": "baton/lang",
    "baton.services.sim": "services/sim",
}
ROLES = ("baton.services.prefill", "baton.services.decode", "baton.services.encoder", "baton.services.sim")


def _package_of(module: str) -> str | None:
    return next((p for p in sorted(PACKAGES, key=len, reverse=True) if module == p or module.startswith(p + ".")), None)


@pytest.mark.parametrize("folder, forbidden", [
    ("router", ("baton.services",)),
    ("services/engine", ("baton.protos", "baton.services.transfer", "baton.services.worker", "baton.services.common",
                         "baton.router", "baton.deploy", *ROLES)),
    ("services/transfer", ("baton.services.engine", "baton.services.worker", "baton.router", "baton.deploy", *ROLES)),
    ("services/common", ("baton.services.engine", "baton.services.worker", "baton.services.transfer",
                         "baton.router", *ROLES)),
    ("services/worker", ("baton.router", "baton.deploy", *ROLES)),
    ("protos", ("baton.services", "baton.router", "baton.deploy")),
    ("services/sim", ("baton.services.engine", "baton.services.transfer", "baton.router", "baton.deploy",
                      "baton.services.prefill", "baton.services.decode", "baton.services.encoder")),
    ("baton/lang", ("baton.services", "baton.router", "baton.protos", "baton.deploy", "baton.bench")),
])
def test_forbidden_imports(folder: str, forbidden: tuple[str, ...]) -> None:
    assert baton_imports(folder, *forbidden) == []


def test_roles_are_imported_only_by_the_cli() -> None:
    for package, folder in PACKAGES.items():
        if package in ROLES or package == "baton.deploy":
            continue
        assert baton_imports(folder, *ROLES) == [], f"{package} imports a role package"


def test_package_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package, folder in PACKAGES.items():
        for names in package_imports(folder).values():
            graph[package].update(q for q in map(_package_of, names) if q is not None and q != package)
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise AssertionError(f"packages import each other in a cycle: {error.args[1]}") from None
    assert order.index("baton.services.engine") < order.index("baton.services.worker") < \
        order.index("baton.services.decode")
