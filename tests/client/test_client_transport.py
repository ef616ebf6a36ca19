"""The site agent's HTTP layer retries what is safe to retry, with jittered backoff."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from facefed.client.launcher import free_port
from facefed.client.transport import RetryPolicy, Transport
from facefed.core.errors import (
    GoneError,
    NotFoundError,
    PermissionDeniedError,
    ServiceError,
)


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, body) of the server's script."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        server = self.server
        server.seen.append(
            {
                "path": self.path,
                "idempotency": self.headers.get("Idempotency-Key"),
                "auth": self.headers.get("Authorization"),
            }
        )
        status, body = server.script.pop(0) if server.script else (200, {"ok": True})
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    httpd.script = []
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _transport(url: str, sleeps: list[float], attempts: int = 4) -> Transport:
    return Transport(
        url,
        api_key="ffk_secret",
        policy=RetryPolicy(max_attempts=attempts, base_delay_s=0.5, max_delay_s=2.0),
        rng=np.random.default_rng(3),
        timeout_s=5.0,
        sleep=sleeps.append,
    )


def test_backoff_is_full_jitter_under_a_doubling_cap():
    policy = RetryPolicy(max_attempts=6, base_delay_s=0.5, max_delay_s=3.0)
    rng = np.random.default_rng(0)
    for retry, cap in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        waits = [policy.delay(retry, rng) for _ in range(200)]
        assert min(waits) >= 0.0 and max(waits) <= cap
        assert max(waits) > 0.8 * cap  # spread over the whole interval
    same = [RetryPolicy().delay(1, np.random.default_rng(9)) for _ in range(2)]
    assert same[0] == same[1]  # the injected generator decides


def test_5xx_is_retried_with_the_same_idempotency_key(server):
    server.script = [
        (503, {"detail": "busy"}),
        (500, {"detail": "boom"}),
        (201, {"id": 1}),
    ]
    sleeps: list[float] = []
    transport = _transport(f"http://127.0.0.1:{server.server_port}", sleeps)
    body = transport.request(
        "POST", "/subjects", json={}, headers={"Idempotency-Key": "k1"}, retry=True
    )
    assert body == {"id": 1}
    assert [seen["idempotency"] for seen in server.seen] == ["k1", "k1", "k1"]
    assert all(seen["path"] == "/v1/subjects" for seen in server.seen)
    assert server.seen[0]["auth"] == "Bearer ffk_secret"
    assert len(sleeps) == 2 and sleeps[0] <= 0.5 and sleeps[1] <= 1.0


def test_an_unsafe_request_is_not_repeated_after_a_5xx(server):
    server.script = [(500, {"detail": "boom"}), (200, {"ok": True})]
    sleeps: list[float] = []
    transport = _transport(f"http://127.0.0.1:{server.server_port}", sleeps)
    with pytest.raises(ServiceError, match="HTTP 500"):
        transport.request("DELETE", "/subjects/s1", retry=False)
    assert len(server.seen) == 1 and sleeps == []


def test_attempts_are_bounded_when_nothing_listens():
    sleeps: list[float] = []
    transport = _transport(f"http://127.0.0.1:{free_port()}", sleeps, attempts=3)
    with pytest.raises(ServiceError, match="after 3 attempt"):
        transport.request("GET", "/health", retry=False)
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, PermissionDeniedError), (403, PermissionDeniedError), (404, NotFoundError),
     (410, GoneError)],
)  # fmt: skip
def test_4xx_maps_to_facefed_errors_without_retry(server, status, error):
    server.script = [(status, {"detail": "no such subject"})]
    sleeps: list[float] = []
    transport = _transport(f"http://127.0.0.1:{server.server_port}", sleeps)
    with pytest.raises(error, match="no such subject"):
        transport.request("GET", "/subjects/s1/export", retry=True)
    assert len(server.seen) == 1 and sleeps == []


def test_the_api_key_never_appears_in_errors(server):
    server.script = [(500, {"detail": "x"})] * 4
    transport = _transport(f"http://127.0.0.1:{server.server_port}", [])
    with pytest.raises(ServiceError) as raised:
        transport.request("GET", "/identify", retry=True)
    assert "ffk_secret" not in str(raised.value)
