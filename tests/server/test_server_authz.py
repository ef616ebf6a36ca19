"""Every endpoint against every role, driven by the app's own OpenAPI routes.

A route missing from the table fails the test: a new endpoint must say who
may call it. Router modules of other parts declare their rows next to their
router as `AUTHZ_ROLES` (same shape as `ROLES` below).
"""

import importlib

import numpy as np
import pytest
from conftest import consent, unit_vectors, wire

from facefed.server.api import ROUTER_MODULES

EVERYONE = {"admin", "site", "other_site", "subject", "none"}
ADMIN = {"admin"}
SITES = {"site", "other_site"}
KEYS = {"admin", "site", "other_site"}
OWNERS = {"admin", "site", "subject"}

ROLES: dict[tuple[str, str], set[str]] = {
    ("GET", "/v1/health"): EVERYONE,
    ("GET", "/v1/receipts/public-key"): EVERYONE,
    ("POST", "/v1/subjects"): SITES,
    ("POST", "/v1/subjects/{subject_id}/templates"): {"site"},
    ("GET", "/v1/subjects/{subject_id}/export"): OWNERS,
    ("DELETE", "/v1/subjects/{subject_id}"): OWNERS,
    ("POST", "/v1/subjects/{subject_id}/consent/withdraw"): OWNERS,
    ("POST", "/v1/identify"): KEYS,
    ("POST", "/v1/verify"): KEYS,
    ("GET", "/v1/keys/protection"): KEYS,
    ("GET", "/v1/collections"): KEYS,
    ("GET", "/v1/collections/{collection_id}"): KEYS,
    ("POST", "/v1/audit/refusals"): SITES,
    ("POST", "/v1/he/contexts"): SITES,
    ("POST", "/v1/he/contexts/{context_id}/verify/{subject_id}"): {"site"},
    ("POST", "/v1/he/contexts/{context_id}/identify"): {"site"},
    ("POST", "/v1/admin/sites"): ADMIN,
    ("GET", "/v1/admin/sites"): ADMIN,
    ("POST", "/v1/admin/api-keys"): ADMIN,
    ("GET", "/v1/admin/api-keys"): ADMIN,
    ("DELETE", "/v1/admin/api-keys/{key_id}"): ADMIN,
    ("POST", "/v1/admin/collections"): ADMIN,
    ("POST", "/v1/admin/collections/{collection_id}/rotate"): ADMIN,
    ("POST", "/v1/admin/protection-keys"): ADMIN,
    ("GET", "/v1/admin/protection-keys"): ADMIN,
    ("POST", "/v1/admin/purge-expired"): ADMIN,
    ("GET", "/v1/admin/audit"): ADMIN,
    ("GET", "/v1/admin/audit/verify"): ADMIN,
    # Federated training (server/federated/api.py): admin only, as documented there.
    ("POST", "/v1/training/runs"): ADMIN,
    ("GET", "/v1/training/runs"): ADMIN,
    ("GET", "/v1/training/runs/{run_id}"): ADMIN,
    ("POST", "/v1/training/runs/{run_id}/cancel"): ADMIN,
    ("GET", "/v1/models"): ADMIN,
    ("POST", "/v1/models/{model_id}/promote"): ADMIN,
}


def _all_rows() -> dict[tuple[str, str], set[str]]:
    rows = dict(ROLES)
    for name in ROUTER_MODULES:
        rows.update(getattr(importlib.import_module(name), "AUTHZ_ROLES", {}))
    return rows


def _routes(client) -> set[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return {(method.upper(), path) for path, item in paths.items() for method in item}


@pytest.fixture
def setup(world):
    """A context row of the first site and a spare API key, for path parameters."""
    from facefed.server.db import HeContext, session_scope, utcnow

    service = world.client.app.state.service
    with session_scope(service.sessions) as session:
        session.add(
            HeContext(
                id="ctx1", site_id=world.site_id, data=b"junk", created_at=utcnow()
            )
        )
    spare = world.client.post(
        "/v1/admin/api-keys",
        json={"role": "admin"},
        headers=world.auth(world.admin_key),
    ).json()["id"]
    return world, spare


def _enroll(world):
    vector = unit_vectors(np.random.default_rng(), 1)[0]
    answer = world.client.post(
        "/v1/subjects",
        json={"consent": consent(), "templates": [wire(world.protection_key, vector)]},
        headers=world.auth(world.site_key),
    )
    assert answer.status_code == 201, answer.text
    return answer.json()


def _body(world, method: str, path: str, subject_id: str) -> dict:
    """A valid body, so that only the credential decides the answer."""
    if path.startswith("/v1/he/"):
        return {"content": b"not a ciphertext"}
    template = wire(world.protection_key, unit_vectors(np.random.default_rng(), 1)[0])
    name = f"x{np.random.default_rng().integers(1 << 30)}"
    bodies = {
        "/v1/subjects": {"consent": consent(), "templates": [template]},
        "/v1/subjects/{subject_id}/templates": {"templates": [template]},
        "/v1/identify": {"template": template},
        "/v1/verify": {"subject_id": subject_id, "template": template},
        "/v1/audit/refusals": {"stage": "quality", "reasons": ["too blurred"]},
        "/v1/admin/sites": {"name": name},
        "/v1/admin/api-keys": {"role": "admin"},
        "/v1/admin/collections": {
            "id": name,
            "model_id": "m",
            "scheme": "orthonormal-v1",
            "dim": 128,
        },
        "/v1/admin/collections/{collection_id}/rotate": {"to_version": 99},
        "/v1/admin/protection-keys": {"scheme": "orthonormal-v1"},
    }
    if method in ("GET", "DELETE") or path not in bodies:
        return {}
    return {"json": bodies[path]}


def test_every_route_has_a_row(world):
    routes = _routes(world.client)
    rows = _all_rows()
    missing = routes - set(rows)
    assert not missing, f"routes without an authorisation row: {sorted(missing)}"
    assert not set(rows) - routes, "rows for routes that do not exist"


def test_every_route_against_every_role(setup):
    world, spare = setup
    credentials = {
        "admin": world.auth(world.admin_key),
        "site": world.auth(world.site_key),
        "other_site": world.auth(world.other_site_key),
        "none": {},
    }
    checked = 0
    for (method, path), allowed in sorted(_all_rows().items()):
        for role in sorted(EVERYONE):
            subject = _enroll(world)
            if role == "subject":
                headers = {"Authorization": f"Bearer {subject['subject_token']}"}
            else:
                headers = credentials[role]
            url = (
                path.replace("{subject_id}", subject["subject_id"])
                .replace("{context_id}", "ctx1")
                .replace("{key_id}", spare)
                .replace("{collection_id}", "default")
            )
            kwargs = _body(world, method, path, subject["subject_id"])
            answer = world.client.request(method, url, headers=headers, **kwargs)
            where = (
                f"{method} {path} as {role}: {answer.status_code} {answer.text[:99]}"
            )
            if role in allowed:
                assert answer.status_code not in (401, 403), where
            elif role == "none":
                assert answer.status_code == 401, where
            else:
                assert answer.status_code == 403, where
            checked += 1
    assert checked == len(_all_rows()) * len(EVERYONE)
