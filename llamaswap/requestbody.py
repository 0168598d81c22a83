"""Request bodies of model-dispatched routes: model id extraction (RT-1) and filters (RT-9).

Pure functions over bytes and files; no Twisted.
"""
from __future__ import annotations

import json
import re
from typing import Any, BinaryIO, Optional

import attr

from llamaswap.errors import InvalidJSON, InvalidMultipart

_CHUNK = 64 * 1024
#: Multipart part headers larger than this are refused (a sane bound of our own, not a documented limit).
_MAX_PART_HEADERS = 16 * 1024
#: The value of the ``model`` form field is read only up to this size.
_MAX_MODEL_FIELD = 64 * 1024


@attr.s(frozen=True)
class JSONBody:
    data: dict = attr.ib()
    raw: bytes = attr.ib()

    @property
    def model(self) -> Any:
        return self.data.get("model")

    @property
    def stream(self) -> bool:
        return self.data.get("stream") is True


def parse_json_body(raw: bytes) -> JSONBody:
    """RT-1: any non-empty body is JSON whatever its Content-Type, and must be an object."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidJSON(f"invalid JSON body: {e}") from None
    if not isinstance(data, dict):
        raise InvalidJSON("invalid JSON body: not a JSON object")
    return JSONBody(data, raw)


def _split_key(key: str) -> list[str]:
    r"""RT-9: ``a.b`` names field b of object a; ``\.`` is a literal dot."""
    parts, current, i = [], [], 0
    while i < len(key):
        ch = key[i]
        if ch == "\\" and i + 1 < len(key) and key[i + 1] == ".":
            current.append(".")
            i += 2
            continue
        if ch == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _set_path(data: dict, key: str, value: Any) -> None:
    path = _split_key(key)
    if path == ["model"]:
        return  # the key "model" is protected (RT-9)
    node = data
    for name in path[:-1]:
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
        node = child
    node[path[-1]] = value


def _strip_path(data: dict, key: str) -> None:
    path = _split_key(key)
    if path == ["model"]:
        return
    node: Any = data
    for name in path[:-1]:
        node = node.get(name) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def apply_filters(body: JSONBody, model: Any, requested: str, upstream_model: Optional[str]) -> bytes:
    """RT-4/RT-8/RT-9/RT-10: the body to send upstream.

    :param model: the ``ModelConfig`` (its filters and ``useModelName``).
    :param requested: the requested name after profile stripping (for setParamsByID).
    :param upstream_model: the value ``model`` must have upstream, or None to keep it.
    A body no filter changed is returned byte-for-byte.
    """
    extra = model.set_params_by_id.get(requested)
    if not (model.strip_params or model.set_params or extra) and (
            upstream_model is None or _same_model(body.data, upstream_model)):
        return body.raw  # nothing to apply (the usual request): no copy, no re-encoding
    data = json.loads(body.raw)  # a private copy to edit
    before = json.dumps(data, sort_keys=False)
    if upstream_model is not None:
        data["model"] = upstream_model
    for key in model.strip_params:
        _strip_path(data, key)
    for key in sorted(model.set_params):
        _set_path(data, key, model.set_params[key])
    if extra:
        for key in sorted(extra):
            _set_path(data, key, extra[key])
    if json.dumps(data, sort_keys=False) == before:
        return body.raw
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _same_model(data: dict, name: str) -> bool:
    """Whether the body's ``model`` already is ``name`` (setting it would change nothing)."""
    current = data.get("model")
    return type(current) is str and current == name


# -- multipart (RT-1) ------------------------------------------------------------------------

_BOUNDARY_RE = re.compile(rb'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_NAME_RE = re.compile(rb'\bname="([^"]*)"|\bname=([^;\s]+)', re.IGNORECASE)


def multipart_boundary(content_type: bytes) -> Optional[bytes]:
    """The boundary of a ``multipart/form-data`` Content-Type, or None for other types."""
    if not content_type.lower().lstrip().startswith(b"multipart/form-data"):
        return None
    m = _BOUNDARY_RE.search(content_type)
    if m is None:
        raise InvalidMultipart("invalid multipart body: no boundary in Content-Type")
    return m.group(1) or m.group(2)


@attr.s(frozen=True)
class FormField:
    value: bytes = attr.ib()
    start: int = attr.ib()  # offset of the value in the body
    end: int = attr.ib()


def find_form_field(fileobj: BinaryIO, size: int, boundary: bytes, name: bytes) -> Optional[FormField]:
    """Scan a spooled multipart body for the form field ``name`` without loading it whole.

    Raises ``InvalidMultipart`` when the body is not a well-formed multipart body.
    """
    delimiter = b"--" + boundary
    positions = _find_all(fileobj, size, delimiter)
    if not positions:
        raise InvalidMultipart("invalid multipart body: boundary not found")
    found = None
    closed = False
    for i, pos in enumerate(positions):
        after = pos + len(delimiter)
        fileobj.seek(after)
        marker = fileobj.read(2)
        if marker == b"--":
            closed = True
            break
        if i + 1 >= len(positions):
            break
        headers_start = after + 2  # CRLF after the delimiter
        fileobj.seek(headers_start)
        head = fileobj.read(_MAX_PART_HEADERS)
        end_of_headers = head.find(b"\r\n\r\n")
        if marker != b"\r\n" or end_of_headers < 0:
            raise InvalidMultipart("invalid multipart body: malformed part headers")
        headers = head[:end_of_headers]
        value_start = headers_start + end_of_headers + 4
        value_end = positions[i + 1] - 2  # the CRLF before the next delimiter
        if value_end < value_start:
            raise InvalidMultipart("invalid multipart body: truncated part")
        if found is None and _part_name(headers) == name:
            fileobj.seek(value_start)
            value = fileobj.read(min(value_end - value_start, _MAX_MODEL_FIELD))
            found = FormField(value, value_start, value_end)
    if not closed:
        raise InvalidMultipart("invalid multipart body: missing closing boundary")
    return found


def _part_name(headers: bytes) -> Optional[bytes]:
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            m = _NAME_RE.search(value)
            if m:
                return m.group(1) if m.group(1) is not None else m.group(2)
    return None


def _find_all(fileobj: BinaryIO, size: int, needle: bytes) -> list[int]:
    """Offsets of every ``needle`` that starts a line (at 0 or after CRLF)."""
    found: list[int] = []
    seen: set[int] = set()
    overlap = len(needle) + 2
    offset = 0
    carry = b""
    fileobj.seek(0)
    while offset < size:
        chunk = fileobj.read(_CHUNK)
        if not chunk:
            break
        data = carry + chunk
        base = offset - len(carry)
        start = 0
        while True:
            j = data.find(needle, start)
            if j < 0:
                break
            absolute = base + j
            if absolute == 0 or (j >= 2 and data[j - 2:j] == b"\r\n"):
                if absolute not in seen:
                    seen.add(absolute)
                    found.append(absolute)
            start = j + 1
        offset += len(chunk)
        carry = data[-overlap:]
    return found
