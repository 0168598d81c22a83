"""Property tests for bad input (issue 5; CFG-3, ERR-1, CFG-28).

* Any YAML document (config-shaped or not) loads as a ``Config`` or raises ``ConfigError``
  whose lines each name a path; no other exception escapes.
* Any request (method, path, query, headers, body) sent to the in-memory site
  (tests/test_resources.py's harness: our ``AccessLogSite`` and resource tree, real
  ``UpstreamProcess`` objects on a fake reactor, an in-memory upstream) ends with a
  response: either proxied to the upstream, or a JSON error; never a 500/traceback and
  never a request left hanging. The same for raw bytes written to the HTTP channel.
"""
from __future__ import annotations

import json
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from llamaswap.config import Config, ConfigError, GroupConfig, parse_config
from llamaswap.config.keys import children, unsupported_children
from tests.factories import make_model
from tests.test_resources import Collect, HTTPCase

# the keys the reader takes at each level, from the key table
_TOP_KEYS, _TOP_UNSUPPORTED = children(""), unsupported_children("")
_MODEL_KEYS, _MODEL_UNSUPPORTED = children("models.<id>"), unsupported_children("models.<id>")
_GROUP_KEYS = children("groups.<groupId>")

# -- configs -------------------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["srv --port ${PORT}", "${PORT}", "${MODEL_ID}", "${nope}", "${env.HOME}", "${env.NOPE}",
                     "http://127.0.0.1:${PORT}", "1GiB", "12XB", "none", "/health", "fifo", "swap-aware",
                     "debug", "both", "a", "b", "p:a", "${m}", "-1", "0", "true", "yes", "~"]))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(["a", "b", "m"])),
                                            inner, max_size=4)),
    max_leaves=12)


def _keyed(keys: frozenset, values) -> st.SearchStrategy:
    return st.dictionaries(st.one_of(st.sampled_from(sorted(keys)), st.text(max_size=8)), values, max_size=6)


_MODEL = st.one_of(_keyed(_MODEL_KEYS | _MODEL_UNSUPPORTED, _VALUES),
                   st.fixed_dictionaries({"cmd": st.sampled_from(["srv --port ${PORT}", "srv ${m}", "x"])},
                                         optional={k: _VALUES for k in sorted(_MODEL_KEYS - {"cmd"})}),
                   _VALUES)
def _optional(**keys) -> st.SearchStrategy:
    """A mapping with any of these keys (the strategy of each value given), or any other value."""
    return st.one_of(st.fixed_dictionaries({}, optional=keys), _VALUES)


_GROUPS = st.one_of(st.dictionaries(st.sampled_from(["g", "h"]), _keyed(_GROUP_KEYS, _VALUES), max_size=2),
                    _VALUES)
_MATRIX = _optional(
    vars=st.one_of(st.dictionaries(st.sampled_from(["x", "y", "bad name"]), st.sampled_from(["a", "b", "zz"]),
                                   max_size=2), _VALUES),
    evict_costs=st.one_of(st.dictionaries(st.sampled_from(["a", "x", "zz"]), st.integers(-1, 5), max_size=2),
                          _VALUES),
    sets=st.one_of(st.dictionaries(st.sampled_from(["s", "t"]),
                                   st.sampled_from(["a", "a & b", "(a | x) & b", "+s", "+t", "a & (", "zz", ""]),
                                   max_size=2), _VALUES))
_ROUTING = _optional(
    router=_optional(use=st.one_of(st.sampled_from(["group", "matrix", ""]), _VALUES),
                     settings=_optional(groups=_GROUPS, matrix=_MATRIX)),
    scheduler=_optional(use=st.one_of(st.just("fifo"), _VALUES),
                        settings=_optional(fifo=_optional(priority=st.one_of(
                            st.dictionaries(st.sampled_from(["a", "al", "zz"]), st.integers(-3, 3), max_size=3),
                            _VALUES)))))
_MEMORY = _optional(budget=st.one_of(st.sampled_from(["1GiB", "512MB", 10**9]), _VALUES),
                    overhead=_VALUES, policy=st.one_of(st.sampled_from(["cost", "lru"]), _VALUES))

_TOP = st.fixed_dictionaries(
    {},
    optional={
        "models": st.one_of(st.dictionaries(st.sampled_from(["a", "b", "c/d", "p:a", "", "x y"]), _MODEL,
                                            max_size=3), _VALUES),
        "groups": _GROUPS,
        "matrix": _MATRIX,
        "routing": _ROUTING,
        "memory": _MEMORY,
        "profiles": st.one_of(st.dictionaries(st.sampled_from(["p", "q"]),
                                              st.lists(st.sampled_from(["a", "b", "zz"]), max_size=3)),
                              _VALUES),
        "macros": st.one_of(st.dictionaries(st.sampled_from(["m", "PORT", "bad name", "n"]), _VALUES,
                                            max_size=3), _VALUES),
        "scheduler": st.one_of(_keyed(frozenset({"maxWait", "policy"}), _VALUES), _VALUES),
        **{k: _VALUES for k in sorted(_TOP_KEYS | _TOP_UNSUPPORTED)
           if k not in ("models", "groups", "profiles", "macros", "scheduler", "matrix", "routing", "memory")},
    })


def _dump(doc) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, default_flow_style=False, sort_keys=False)


def _check_parse(text: str) -> None:
    try:
        config = parse_config(text, "prop.yaml", {"HOME": "/home/u"})
    except ConfigError as e:
        assert e.errors, "a ConfigError must list its problems"
        for line in e.errors:
            assert isinstance(line, str) and ": " in line, f"not '<path>: <message>': {line!r}"
    else:
        assert isinstance(config, Config)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_TOP, _VALUES))
def test_any_yaml_document_gives_config_or_config_error(doc):
    """Config-shaped documents with values of every type: a Config, or a ConfigError listing paths."""
    _check_parse(_dump(doc))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TOP, st.sampled_from(["flow", "anchors", "tabs", "bom", "crlf", "doc-end"]))
def test_yaml_spellings_give_config_or_config_error(doc, spelling):
    """The same documents in other YAML spellings (flow style, anchors, CRLF, BOM, tabs)."""
    if spelling == "flow":
        text = yaml.safe_dump(doc, default_flow_style=True)
    elif spelling == "anchors":
        text = "x-base: &base {ttl: 5}\n" + _dump(doc).replace("models:\n", "models:\n  anch:\n    <<: *base\n"
                                                                "    cmd: srv ${PORT}\n", 1)
    elif spelling == "tabs":
        text = _dump(doc).replace("  ", "\t", 1)
    elif spelling == "bom":
        text = "\ufeff" + _dump(doc)
    elif spelling == "crlf":
        text = _dump(doc).replace("\n", "\r\n")
    else:
        text = _dump(doc) + "...\n---\nmodels: {}\n"
    _check_parse(text)


# -- HTTP requests -----------------------------------------------------------------------------------

_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/audio/transcriptions",
          "/v1/messages", "/completion", "/infill", "/v1/rerank", "/upstream", "/upstream/", "/upstream/a/",
          "/upstream/a/x/y", "/upstream/al/props", "/upstream/nope/x", "/upstream/p:a/health", "/v1/models",
          "/models", "/running", "/unload", "/api/models/unload", "/api/models/unload/a",
          "/api/models/load/a", "/api/models/load/zz", "/api/version", "/api/models", "/health", "/logs",
          "/ui", "/ui/", "/", "/v1", "/api", "/nope", "//", "/v1/chat/completions/extra", "/%2e%2e/etc"]
_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)
_HVALUE = st.text(alphabet=string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "")
                  .replace("\x0c", ""), max_size=30)
_MODEL_NAMES = st.one_of(st.sampled_from(["a", "al", "b", "p:a", "p:b", "p:zz", "zz", "", "a/b", "../a"]),
                         st.text(max_size=10), st.integers(), st.none(), st.lists(st.just("a"), max_size=2))
_JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                      st.text(max_size=10)),
                            lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                            max_leaves=8)
_JSON_BODY = st.builds(
    lambda model, has_model, rest, stream: json.dumps(
        {**rest, **({"model": model} if has_model else {}), **({"stream": stream} if stream is not None else {})},
        default=str).encode(),
    _MODEL_NAMES, st.booleans(), st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=4),
    st.one_of(st.none(), st.booleans(), st.just("yes")))
_BOUNDARY = "XyZ123"


def _multipart(fields: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for name, value in fields:
        out += (f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").encode() \
            + value + b"\r\n"
    return out + f"--{_BOUNDARY}--\r\n".encode()


_MULTIPART_BODY = st.one_of(
    st.lists(st.tuples(st.sampled_from(["model", "file", "x", "mo\"del"]),
                       st.one_of(st.sampled_from([b"a", b"al", b"zz", b"p:a", b"\xff\xfe"]), st.binary(max_size=20))),
             max_size=3).map(_multipart),
    st.binary(max_size=60))
_BODIES = st.one_of(_JSON_BODY, st.binary(max_size=80), st.just(b""), _MULTIPART_BODY,
                    st.text(max_size=40).map(lambda t: t.encode("utf-8")))
_CTYPES = st.sampled_from([None, "application/json", f"multipart/form-data; boundary={_BOUNDARY}",
                           "multipart/form-data", "multipart/form-data; boundary=", "text/plain",
                           "application/x-www-form-urlencoded", "application/json; charset=latin-1", "\x7f"])


class _SiteCase(HTTPCase):
    """One harness per example (the fake reactor, router and site are cheap to build)."""

    def runTest(self) -> None:  # pragma: no cover - only used as a harness
        pass

    def setup_site(self) -> None:
        models = [make_model(id="a", aliases=("al",), concurrency_limit=3),
                  make_model(id="b", use_model_name="up-b", proxy="http://127.0.0.1:5801/base"),
                  make_model(id="c", unlisted=True)]
        self.build(models, profiles={"p": ("a", "b")}, max_request_body=4096,
                   groups={"g": GroupConfig("g", members=("a", "b"))})
        # The in-memory upstream is a plain twisted.web Site, which would answer a multipart body
        # it cannot parse with its own 400 page before the stub sees it; llama-server does not.
        self.up_agent._serverFactory._parsePOSTFormSubmission = False

    def failures(self) -> list:
        return [e for e in self.events + self.access
                if e.get("log_failure") is not None or e.get("log_level") is LogLevel.critical]


def _check_response(case: _SiteCase, method: str, response, data: bytes) -> None:
    assert response.code != 500 and b"Traceback" not in data, (response.code, data[:300])
    assert not case.failures(), case.failures()
    if response.code >= 400:
        ctype = response.headers.getRawHeaders(b"content-type") or [b""]
        if method == "HEAD":
            return
        assert ctype[0].startswith(b"application/json"), (response.code, ctype, data[:200])
        body = json.loads(data)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FOO"]),
       path=st.one_of(st.sampled_from(_PATHS),
                      st.builds(lambda p, s: p + s, st.sampled_from(_PATHS),
                                st.text(alphabet=string.ascii_letters + "/%._-:~", max_size=12))),
       query=st.one_of(st.just(""), st.sampled_from(["?model=a", "?model=zz", "?model=", "?model=%ff",
                                                     "?no-history", "?model=p:b&x=1"]),
                       st.text(alphabet=string.ascii_letters + "=&%+", max_size=12).map(lambda q: "?" + q)),
       ctype=_CTYPES, body=_BODIES,
       headers=st.dictionaries(_TOKEN, _HVALUE, max_size=4),
       special=st.lists(st.sampled_from([("Authorization", "Bearer x"), ("Origin", "http://evil"),
                                         ("Connection", "close, x-foo"), ("X-Forwarded-For", "1.2.3.4"),
                                         ("Accept", "text/html"), ("Access-Control-Request-Headers", "a\x01")]),
                        max_size=3))
def test_any_request_is_proxied_or_json_error(method, path, query, ctype, body, headers, special):
    """Never a traceback, never a hang: every request gets a response (upstream's or a JSON error)."""
    case = _SiteCase()
    case.setup_site()
    h = dict(headers)
    h.update(special)
    if ctype is not None:
        h["Content-Type"] = ctype
    raw_headers = {k.encode("latin-1"): v.encode("latin-1") for k, v in h.items()}
    before = len(case.upstream.requests)
    d = case.request(method.encode(), path + query, body, raw_headers)
    for _ in range(3):
        case.reactor.advance(1)
        case.flush()
    response = case.successResultOf(d)              # a hang fails here: no response
    collect = Collect()
    response.deliverBody(collect)
    case.flush()
    case.assertTrue(collect.done.called, "response body never ended")
    _check_response(case, method, response, collect.data)
    proxied = len(case.upstream.requests) > before
    if proxied:
        assert response.code == 200, (response.code, collect.data)
        assert collect.data == (b"" if method == "HEAD" else b'{"ok":true}'), collect.data
    for slot in ("a", "b", "c"):                    # nothing is left in flight or waiting
        assert case.router.counts(slot) == (0, 0), (slot, case.router.counts(slot))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from([b"GET", b"POST", b"PUT", b"OPTIONS", b"G\x00T", b""]),
       target=st.one_of(st.sampled_from([p.encode() for p in _PATHS]), st.binary(max_size=20)),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"", b"FOO"]),
       header_lines=st.lists(st.one_of(st.binary(max_size=30),
                                       st.sampled_from([b"Content-Length: -1", b"Content-Length: 99999999",
                                                        b"Content-Length: 5", b"Content-Length: x",
                                                        b"Transfer-Encoding: chunked",
                                                        b"Content-Type: application/json",
                                                        b"Content-Type: multipart/form-data; boundary=XyZ123",
                                                        b"Expect: 100-continue", b"Host:", b": x"])),
                             max_size=5),
       body=st.one_of(_BODIES, st.just(b"5\r\nhello\r\n0\r\n\r\n"), st.just(b"ffff\r\n" + b"x" * 5000)),
       split=st.integers(0, 200))
def test_raw_bytes_on_the_channel(method, target, version, header_lines, body, split):
    """Arbitrary request bytes, delivered in two writes: a response or a closed connection, no traceback."""
    case = _SiteCase()
    case.setup_site()
    channel = case.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))
    channel.makeConnection(transport)
    data = method + b" " + target + b" " + version + b"\r\n" + b"\r\n".join(header_lines) + \
        (b"\r\n" if header_lines else b"") + b"\r\n" + body
    channel.dataReceived(data[:split])
    if not transport.disconnecting:      # a real transport stops reading once it is closing
        channel.dataReceived(data[split:])
    for _ in range(3):
        case.reactor.advance(1)
        case.flush()
        case.agent._memoryReactor.advance(1) if hasattr(case.agent._memoryReactor, "advance") else None
    out = transport.value()
    assert b"Traceback" not in out and b" 500 " not in out.split(b"\r\n", 1)[0], out[:300]
    assert not case.failures(), case.failures()
    if out:
        assert out.startswith(b"HTTP/1."), out[:100]
    channel.connectionLost(Failure(ConnectionDone()))
    case.flush()
    for slot in ("a", "b", "c"):
        assert case.router.counts(slot) == (0, 0)
