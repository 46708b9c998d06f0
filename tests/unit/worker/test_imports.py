"""Who may import whom around the worker shell: common knows no engine and no worker; the
worker shell imports no role package (the roles import it)."""
from __future__ import annotations

from tests.helpers.imports import baton_imports


def test_common_knows_no_engine_and_no_worker():
    assert baton_imports("services/common", "baton.services.engine", "baton.services.worker",
                         "baton.services.transfer", "baton.services.prefill", "baton.services.decode") == []


def test_worker_imports_no_role_package():
    assert baton_imports("services/worker", "baton.services.prefill", "baton.services.decode",
                         "baton.services.encoder") == []
