"""Small HTTP helpers of the admin site: responses, HTML flattening, body limits."""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import quote

import attrs
from twisted.python.failure import Failure
from twisted.web.server import Request
from twisted.web.template import Tag, flattenString

MAX_BODY_BYTES = 64 * 1024

#: Sent with every response.  No HSTS: the certificate is often self-signed,
#: and HSTS would make its warning impossible to click through.
SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",
    b"cache-control": b"no-store",
    b"server": b"evserver",
}


@attrs.define
class Cookie:
    name: str
    value: str
    #: None: a browser-session cookie; 0: delete it now.
    max_age: int | None = None


@attrs.define
class Response:
    """What a handler answers; the site writes it."""

    status: int = 200
    body: bytes = b""
    content_type: bytes = b"text/html; charset=utf-8"
    headers: dict[bytes, bytes] = attrs.Factory(dict)
    cookies: list[Cookie] = attrs.Factory(list)


def render_html(tree: Tag | list[Any]) -> bytes:
    """Flatten a template tree (escaping every string) into a whole HTML document."""
    out: list[Any] = []
    flattenString(None, tree).addBoth(out.append)
    result = out[0]  # nothing in our trees is asynchronous, so it has fired
    if isinstance(result, Failure):
        result.raiseException()
    return b"<!DOCTYPE html>\n" + result


def html(tree: Tag | list[Any], status: int = 200) -> Response:
    return Response(status, render_html(tree))


def json_response(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(status, body, b"application/json; charset=utf-8")


def json_error(status: int, message: str, field: str | None = None,
               fields: dict[str | None, str] | None = None) -> Response:
    data: dict[str, Any] = {"error": message}
    if field is not None:
        data["field"] = field
    if fields and len(fields) > 1:
        data["fields"] = {k or "": v for k, v in fields.items()}
    return json_response(data, status)


def redirect(location: str, status: int = 303) -> Response:
    return Response(status, b"", b"text/plain; charset=utf-8",
                    headers={b"location": location.encode("ascii")})


def plain(status: int, text: str) -> Response:
    return Response(status, text.encode("utf-8"), b"text/plain; charset=utf-8")


def segment(name: str) -> str:
    """A name quoted as one URL path segment (slashes included)."""
    return quote(name, safe="")


def safe_next(value: str | None) -> str:
    """A local path to go to after login ('/' unless ``value`` is one)."""
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value)
    ):
        return "/"
    return value


class AdminRequest(Request):
    """A request whose body is kept to MAX_BODY_BYTES; more marks it ``too_large``."""

    too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY_BYTES:
            self.too_large = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        assert self.content is not None
        if self.content.tell() + len(data) > MAX_BODY_BYTES:
            self.too_large = True
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)
