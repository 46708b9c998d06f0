"""Keys at the router (router/auth.py, gateway/auth.py): one Bearer parser for HTTP and gRPC,
admin keys separate from client keys, keys from a file or the environment, operator pages
behind the admin key on request, and /docs off by default and free of external assets."""
from __future__ import annotations

import re

import pytest

from baton.router.auth import AuthError, Caller, fingerprint, identify, parse_bearer
from baton.router.config import RouterConfig
from tests.unit.router.gateway.test_app import call


@pytest.fixture
def keys(tmp_path):
    admin = tmp_path / "admin-keys"
    admin.write_text("root-key\n")
    clients = tmp_path / "api-keys"
    clients.write_text("alice-key\n")
    return {"api_keys_file": str(clients), "admin_api_keys_file": str(admin)}


def test_bearer_parsing_is_one_rule():
    assert parse_bearer("Bearer k1") == parse_bearer("bearer  k1 ") == parse_bearer("BEARER k1") == "k1"
    assert parse_bearer("Basic k1") is None and parse_bearer("k1") is None and parse_bearer("Bearer ") is None
    assert parse_bearer(None) is None


def test_keys_come_from_file_and_environment(keys, monkeypatch):
    monkeypatch.setenv("BATON_API_KEYS", "env-key, other-env-key")
    config = RouterConfig(**keys)
    assert config.api_key_list == ("alice-key", "env-key", "other-env-key")
    assert config.admin_key_list == ("root-key",)
    assert RouterConfig(api_keys_env="").api_key_list == ()


def test_admin_keys_are_separate_from_client_keys(keys):
    config = RouterConfig(**keys)
    alice = identify(config, "Bearer alice-key")
    assert alice == Caller(owner=fingerprint("alice-key"), admin=False) and "alice" not in alice.owner
    assert identify(config, "Bearer root-key").admin  # an admin key works on client routes too
    with pytest.raises(AuthError) as refused:
        identify(config, "Bearer alice-key", admin=True)
    assert refused.value.reason == "admin_key_required"
    for header, reason in ((None, "missing_api_key"), ("Bearer nope", "invalid_api_key"),
                           ("Basic alice-key", "invalid_api_key")):
        with pytest.raises(AuthError) as refused:
            identify(config, header)
        assert refused.value.reason == reason
    clients_only = RouterConfig(api_keys="alice-key")
    with pytest.raises(AuthError):  # no admin keys: a client key never registers a worker
        identify(clients_only, "Bearer alice-key", admin=True)
    assert identify(RouterConfig(), None, admin=True).admin  # an open router stays open


def test_a_request_belongs_to_its_key(keys):
    config = RouterConfig(**keys)
    alice, root = identify(config, "Bearer alice-key"), identify(config, "Bearer root-key")
    bob = Caller(owner=fingerprint("bob-key"), admin=False)
    assert alice.may_abort(alice.owner) and not bob.may_abort(alice.owner) and root.may_abort(alice.owner)


def test_operator_pages_behind_the_admin_key(fake_core, keys):
    fake_core.config = RouterConfig(protect_admin_endpoints=True, docs=True, **keys)
    for path in ("/metrics", "/workers", "/docs", "/openapi.json"):
        assert call(fake_core, "GET", path).status_code == 401, path
        refused = call(fake_core, "GET", path, headers={"Authorization": "Bearer alice-key"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        assert call(fake_core, "GET", path, headers={"Authorization": "bearer root-key"}).status_code == 200, path
    assert call(fake_core, "GET", "/health").status_code == 200  # probes stay open
    assert call(fake_core, "GET", "/").status_code == 200  # the page; its data needs the key
    models = call(fake_core, "GET", "/v1/models", headers={"Authorization": "Bearer alice-key"})
    assert models.status_code == 200
    fake_core.config = RouterConfig(**keys)  # not protected: the operator pages stay open
    assert call(fake_core, "GET", "/metrics").status_code == 200


def test_docs_are_off_by_default_and_load_nothing_from_elsewhere(fake_core):
    fake_core.config = RouterConfig()
    assert call(fake_core, "GET", "/docs").status_code == 404
    assert call(fake_core, "GET", "/openapi.json").status_code == 404
    fake_core.config = RouterConfig(docs=True)
    page = call(fake_core, "GET", "/docs").text
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # no CDN script or stylesheet
    spec = call(fake_core, "GET", "/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]


def test_cancel_answers_404_for_a_request_that_is_not_yours(fake_core, keys):
    fake_core.config = RouterConfig(**keys)
    response = call(fake_core, "POST", "/v1/requests/cmpl-x/cancel", headers={"Authorization": "Bearer alice-key"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "request_not_found"
    assert call(fake_core, "POST", "/v1/requests/cmpl-x/cancel").status_code == 401
