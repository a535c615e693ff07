"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Owns the one exception the server raises for anything a client should hear about, and turning
pydantic's validation errors into it. It does not own which status a situation deserves: the code
that finds the problem decides.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import JSONResponse

from r1.server.protocol import error_body


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_validation(cls, e: ValidationError) -> APIError:
        """A 400 naming the first problem and where it is (`messages.0.role`)."""
        first = e.errors(include_url=False)[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "json_invalid":
            return cls(400, f"the body is not valid JSON: {message}", code="invalid_json")
        if first["type"] == "missing":
            message = f"{param} is required"
        elif param:
            message = f"{param}: {message}"
        more = len(e.errors()) - 1
        return cls(400, message + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""), param=param)
