"""Errors a client caused or can act on, carried to an OpenAI-shaped JSON response with their HTTP status."""

from __future__ import annotations


class ServeError(Exception):
    """`{"error": {"message", "type", "param", "code"}}` with an HTTP status, as OpenAI's API answers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
