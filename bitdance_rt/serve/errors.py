"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, the param naming the body
field at fault: ApiError (what a route or the guard raises), error_body, and the one-line messages made
from pydantic's validation errors, quoting at most SHOWN_CHARS of a bad value back."""

from __future__ import annotations

import json

SHOWN_CHARS = 100  # most characters of a bad value quoted back in an error message


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code or kind, headers


def error_body(message: str, status: int, param: str | None, code: str | None) -> dict:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _describe(errors) -> tuple[str | None, str]:
    """The first pydantic error as (field, message), quoting at most SHOWN_CHARS of the value."""
    if not errors:
        return None, "invalid request"
    e = errors[0]
    loc = [_cut(str(p)) for p in e.get("loc", ()) if p != "body"]
    kind = e.get("type", "")
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return None, f"the body is not valid JSON ({detail})" if detail else "the body is not valid JSON"
    if kind == "missing" and not loc:
        return None, "the body must be a JSON object with the request's fields (it was empty)"
    if kind in ("model_attributes_type", "dict_type", "model_type") and not loc:
        return None, "the body must be a JSON object with the request's fields"
    param = loc[0] if loc else None
    if kind == "extra_forbidden":
        return (
            param,
            f"unknown field {param!r} (see the API's fields: prompt, n, size, response_format, model, "
            "stream, partial_images, seed, steps, guidance_scale, cfg_schedule, labels)",
        )
    where = ".".join(loc[:1] + [p for p in loc[1:] if p not in ("str", "int")])  # (not the Union member tried)
    got = e.get("input")
    shown = "" if isinstance(got, dict) else f" (got {_quoted(got)})"
    return param, f"{where}: {e.get('msg', 'invalid value')}{shown}"


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _quoted(value) -> str:
    """`value` as JSON, at most SHOWN_CHARS characters (a long string or list is cut before it is
    encoded, so a large value costs no more than a small one)."""
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        value = value[:SHOWN_CHARS]
    elif isinstance(value, (list, tuple)) and len(value) > SHOWN_CHARS // 2:
        value = list(value[: SHOWN_CHARS // 2])
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return _cut(text)
