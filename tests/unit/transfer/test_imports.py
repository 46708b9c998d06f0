"""The transfer package knows no engine and no worker, and its modules import each other without a cycle."""
from __future__ import annotations

from graphlib import CycleError, TopologicalSorter

from tests.helpers.imports import baton_imports, package_imports


def test_transfer_imports_no_engine_and_nothing_above_it():
    assert baton_imports("services/transfer", "baton.services.engine", "baton.services.worker",
                         "baton.services.prefill", "baton.services.decode", "baton.services.encoder",
                         "baton.router", "baton.deploy") == []


def test_transfer_modules_form_no_cycle():
    modules = package_imports("services/transfer")
    graph = {m: {n for n in names if n in modules and n != "baton.services.transfer"}
             for m, names in modules.items() if m != "baton.services.transfer"}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle: {error.args[1]}") from None
    assert order.index("baton.services.transfer.base") < order.index("baton.services.transfer.tcp") \
        < order.index("baton.services.transfer.factory")
