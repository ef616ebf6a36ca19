"""Admin side of the SDK: sites, API keys, protection keys, collections, audit.

The central admin uses it (and the demo and the local deployment use it) to
set a server up: register sites and give each its API key, create the
protection key and the collection sites enroll into, and read or verify the
hash-chained audit log.
"""

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facefed.client.gallery import GalleryClient
from facefed.client.settings import ClientSettings, get_client_settings
from facefed.client.transport import Transport

AUDIT_PAGE = 1000
"""Audit events fetched per request (the server's largest page)."""


@dataclass(frozen=True)
class SiteCredentials:
    """A registered site and its API key (shown once; keep it secret).

    Attributes:
        site_id: The server's id of the site.
        name: The site's name.
        api_key: The site's API key, never shown in `repr`.
    """

    site_id: str
    name: str
    api_key: str = field(repr=False)


class AdminClient:
    """Client of the server's admin API, authenticated with an admin key.

    Args:
        transport: The HTTP layer, carrying an admin key.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @classmethod
    def connect(
        cls,
        *,
        api_key: str,
        settings: ClientSettings | None = None,
        rng: np.random.Generator | None = None,
    ) -> "AdminClient":
        """Build an admin client for the server named in the settings."""
        gallery = GalleryClient.from_settings(
            settings or get_client_settings(), api_key=api_key, rng=rng
        )
        return cls(gallery.transport)

    def close(self) -> None:
        """Close the connections."""
        self._transport.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def register_site(self, name: str) -> SiteCredentials:
        """Register a site and create its API key."""
        site = self._transport.request(
            "POST", "/admin/sites", json={"name": name}, retry=False
        )
        key = self._transport.request(
            "POST",
            "/admin/api-keys",
            json={"role": "site", "site_id": site["id"], "name": f"{name} agent"},
            retry=False,
        )
        return SiteCredentials(site_id=site["id"], name=name, api_key=key["key"])

    def create_protection_key(self, scheme: str, *, secret: bytes | None = None) -> int:
        """Create the next key version of a scheme; returns the version."""
        payload: dict[str, Any] = {"scheme": scheme}
        if secret is not None:
            payload["secret"] = base64.b64encode(secret).decode("ascii")
        body = self._transport.request(
            "POST", "/admin/protection-keys", json=payload, retry=False
        )
        return int(body["version"])

    def create_collection(
        self, collection_id: str, *, model_id: str, scheme: str, dim: int
    ) -> dict[str, Any]:
        """Create a collection for one model and protection scheme."""
        return dict(
            self._transport.request(
                "POST",
                "/admin/collections",
                json={"id": collection_id, "model_id": model_id, "scheme": scheme,
                      "dim": dim},
                retry=False,
            )
        )  # fmt: skip

    def audit_events(self, *, action: str | None = None) -> list[dict[str, Any]]:
        """Every audit event, oldest first, optionally of one action only."""
        events: list[dict[str, Any]] = []
        since = 0
        while True:
            params: dict[str, Any] = {"since_seq": since, "limit": AUDIT_PAGE}
            if action:
                params["action"] = action
            page = self._transport.request(
                "GET", "/admin/audit", params=params, retry=True
            )
            events.extend(page)
            if len(page) < AUDIT_PAGE:
                return events
            since = int(page[-1]["seq"])

    def verify_audit(self) -> dict[str, Any]:
        """Check the audit chain on the server: `ok`, `events`, `problems`."""
        return dict(self._transport.request("GET", "/admin/audit/verify", retry=True))
