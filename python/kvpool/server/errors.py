"""HTTP errors of ``kvpool serve``, rendered in each API's own error shape.

An :class:`ApiError` carries an HTTP status, a kind (one of :data:`KINDS`) and a message;
:func:`openai_body` and :func:`anthropic_body` render it the way each API's clients parse
errors. Handlers raise ApiError; the app turns it into a response in the endpoint's API.
"""

from __future__ import annotations

from typing import Any

from kvpool.errors import KvpoolError

__all__ = ["KINDS", "ApiError", "anthropic_body", "bad_request", "openai_body", "shutting_down"]

# kind -> (OpenAI error type, Anthropic error type)
KINDS: dict[str, tuple[str, str]] = {
    "invalid_request": ("invalid_request_error", "invalid_request_error"),
    "authentication": ("authentication_error", "authentication_error"),
    "not_found": ("not_found_error", "not_found_error"),
    "conflict": ("conflict_error", "invalid_request_error"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "overloaded": ("server_error", "overloaded_error"),
    "server": ("server_error", "api_error"),
}


class ApiError(KvpoolError):
    """A request the server refuses or could not serve.

    ``status`` is the HTTP status, ``kind`` a key of :data:`KINDS`, ``param`` the body
    field at fault (if one is), ``code`` a short machine-readable reason (OpenAI's
    ``code``), ``headers`` extra response headers (``Retry-After`` on 503).
    """

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        assert kind in KINDS, f"unknown error kind {kind!r}: this indicates a bug"
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request error."""
    return ApiError(400, "invalid_request", message, param=param, code=code)


def shutting_down() -> ApiError:
    """A 503 for requests that arrive (or are still waiting) while the server stops."""
    return ApiError(503, "overloaded", "the server is shutting down", headers={"Retry-After": "1"})


def openai_body(error: ApiError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API returns it."""
    return {
        "error": {
            "message": error.message,
            "type": KINDS[error.kind][0],
            "param": error.param,
            "code": error.code,
        }
    }


def anthropic_body(error: ApiError) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``, as Anthropic's API returns it."""
    return {"type": "error", "error": {"type": KINDS[error.kind][1], "message": error.message}}
