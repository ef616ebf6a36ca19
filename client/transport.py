"""HTTP layer of the site agent: retries with jittered backoff and error mapping.

Retries follow the "full jitter" exponential backoff of Brooker, "Exponential
Backoff And Jitter" (AWS Architecture Blog, 2015): before attempt n+1 the
client sleeps a uniform random time in [0, min(cap, base * 2**n)]. Only
requests that are safe to repeat are retried: reads, searches, and writes that
carry an `Idempotency-Key` header the server deduplicates on.
"""

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from facefed.core.errors import (
    ConflictError,
    FacefedError,
    GoneError,
    NotFoundError,
    PermissionDeniedError,
    ServiceError,
)

logger = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"


class RequestRejectedError(FacefedError):
    """Raised when the server refuses a request as invalid (HTTP 400, 413, 422).

    Attributes:
        status_code: The HTTP status the server answered.
        detail: The server's explanation.
    """

    exit_code = 12

    def __init__(self, message: str, *, status_code: int, detail: object) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is retried.

    Attributes:
        max_attempts: Total attempts, the first included (1 means no retry).
        base_delay_s: Cap of the first wait; doubles each attempt.
        max_delay_s: Cap of any single wait.
    """

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(
                f"max_attempts must be at least 1, got {self.max_attempts}."
            )
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError(
                "Backoff delays must not be negative, got "
                f"base {self.base_delay_s} and max {self.max_delay_s}."
            )

    def delay(self, retry_number: int, rng: np.random.Generator) -> float:
        """Seconds to wait before retry `retry_number` (0 for the first retry)."""
        cap = min(self.max_delay_s, self.base_delay_s * (2.0**retry_number))
        return float(rng.uniform(0.0, cap)) if cap > 0 else 0.0


def _is_retryable_status(status_code: int) -> bool:
    return status_code >= 500


def _detail(response: httpx.Response) -> object:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        # The server's own errors are {"error": {"code", "message"}}; FastAPI's
        # request validation errors are {"detail": [...]}.
        if isinstance(error, dict) and "message" in error:
            return error["message"]
        if "detail" in body:
            return body["detail"]
    return body


def raise_for_response(response: httpx.Response) -> None:
    """Turn an error answer into the matching facefed error; do nothing on 2xx.

    Args:
        response: The server's answer.

    Raises:
        PermissionDeniedError: 401 or 403.
        NotFoundError: 404.
        GoneError: 410.
        ConflictError: 409.
        RequestRejectedError: 400, 413, 422 and any other 4xx.
        ServiceError: 5xx.
    """
    status = response.status_code
    if status < 400:
        return
    detail = _detail(response)
    where = f"{response.request.method} {response.request.url.path}"
    message = f"the server refused {where} with HTTP {status}: {detail}"
    if status in (401, 403):
        raise PermissionDeniedError(message)
    if status == 404:
        raise NotFoundError(message)
    if status == 410:
        raise GoneError(message)
    if status == 409:
        raise ConflictError(message)
    if status < 500:
        raise RequestRejectedError(message, status_code=status, detail=detail)
    raise ServiceError(message)


class Transport:
    """An httpx client bound to one server, one API key and one retry policy.

    Args:
        base_url: Server root, e.g. `http://127.0.0.1:8000`; `/v1` is added.
        api_key: Bearer credential; kept only in the request headers.
        policy: Retry policy.
        rng: Source of the backoff jitter.
        timeout_s: Timeout of one attempt.
        verify: TLS verification (True, False, or a CA bundle path).
        sleep: Called with the seconds to wait between attempts (tests pass a
            recorder instead of `time.sleep`).
        http: An httpx client to use instead of building one (its base URL and
            headers are left alone).
        unauthorized_hint: Sentence added to a 401 answer's error (the site
            agent says which setting holds its key when none is configured).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        policy: RetryPolicy,
        rng: np.random.Generator,
        timeout_s: float = 30.0,
        verify: bool | str = True,
        sleep: Callable[[float], None] = time.sleep,
        http: httpx.Client | None = None,
        unauthorized_hint: str | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.Client(
            base_url=base_url.rstrip("/") + "/v1",
            headers=headers,
            timeout=timeout_s,
            verify=verify,
        )
        self._policy = policy
        self._rng = rng
        self._sleep = sleep
        self._unauthorized_hint = unauthorized_hint

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool,
    ) -> Any:
        """Send one request, retrying when it is safe, and return the JSON body.

        Args:
            method: HTTP method.
            path: Path under `/v1`, e.g. `/subjects`.
            json: Body, serialised as JSON.
            content: Raw body bytes instead (sent as application/octet-stream).
            params: Query parameters.
            headers: Extra headers (an idempotency key, a subject token).
            retry: Whether repeating the request is safe; when False, only a
                failure to connect (the request never left) is retried.

        Returns:
            The decoded JSON body, or None for an empty answer.

        Raises:
            ServiceError: The server stayed unreachable or kept answering 5xx.
            FacefedError: A subclass matching a 4xx answer (see
                `raise_for_response`).
        """
        attempts = self._policy.max_attempts
        last_problem = "no attempt made"
        for attempt in range(attempts):
            if attempt:
                wait = self._policy.delay(attempt - 1, self._rng)
                logger.info(
                    "Retrying %s %s in %.2f s (attempt %d of %d): %s",
                    method, path, wait, attempt + 1, attempts, last_problem,
                )  # fmt: skip
                self._sleep(wait)
            try:
                response = self._send(method, path, json, content, params, headers)
            except httpx.ConnectError as error:
                last_problem = (
                    f"cannot connect to {self._http.base_url} ({error}); "
                    "check FACEFED_SERVER_URL and that the server is running"
                )
                continue
            except httpx.TransportError as error:
                last_problem = f"connection failed ({type(error).__name__})"
                if not retry:
                    break
                continue
            if _is_retryable_status(response.status_code) and retry:
                last_problem = f"HTTP {response.status_code}"
                continue
            if response.status_code == 401 and self._unauthorized_hint:
                raise PermissionDeniedError(
                    f"the server refused {method} {path} with HTTP 401: "
                    f"{_detail(response)}. {self._unauthorized_hint}"
                )
            raise_for_response(response)
            if not response.content:
                return None
            return response.json()
        raise ServiceError(
            f"{method} {path} failed after {attempt + 1} attempt(s): {last_problem}."
        )

    def _send(
        self,
        method: str,
        path: str,
        json: object,
        content: bytes | None,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> httpx.Response:
        if content is None:
            return self._http.request(
                method, path, json=json, params=params, headers=headers
            )
        binary = {"Content-Type": "application/octet-stream", **(headers or {})}
        return self._http.request(
            method, path, content=content, params=params, headers=binary
        )
