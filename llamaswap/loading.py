"""``sendLoadingState`` (RT-12): progress as reasoning-content SSE chunks while a
streaming chat request waits for its model, then the upstream's SSE body on the same stream.

The resource layer decides *whether* (``POST /v1/chat/completions``, ``"stream": true``, the
model's effective ``sendLoadingState``, model not ``ready`` at admission, and the admission
not refused with 429); this module does the rest:

* :meth:`LoadingProgress.wait` sends 200 + ``text/event-stream`` at once, then
  ``loading model <id>…\\n``, ``waiting in queue (position N)\\n`` whenever the request's
  queue position changes (asked once with ``router.place``, then followed through the
  ``QueueChanged`` events observed while waiting; nothing is said while it is first in
  line), ``.`` every second on the injected clock, and
  ``\\nmodel ready (<s>s)\\n\\n`` when the lease is granted;
* :meth:`LoadingProgress.relay` forwards the request and relays the upstream's body
  without its status and headers (they are out already). A start failure, an unreachable
  upstream, a non-2xx status or a non-SSE body become one SSE error event in the PROXY-9
  format (with at most 2 KiB of the upstream's body) and the stream ends without
  ``[DONE]``.

It reuses the ``Forwarder``'s send (with its PROXY-10 retry), body relay (back-pressure)
and PROXY-9 handling.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from llamaswap.errors import LlamaSwapError, error_body
from llamaswap.observe import ModelEvent, QueueChanged
from llamaswap.proxy import RelayOutcome

#: RT-12: at most this much of a refusing upstream's body goes into the error event.
ERROR_BODY_LIMIT = 2048
#: RT-12: one ``.`` per this many seconds while waiting.
DOT_INTERVAL = 1.0


def loading_chunk(requested: str, text: str, created: int) -> bytes:
    """One RT-12 chunk (``data: {...}\\n\\n``), compact JSON, UTF-8."""
    payload = {"id": "llamaswap-loading", "object": "chat.completion.chunk", "created": created,
               "model": requested,
               "choices": [{"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def error_event(kind: str, code: str, message: str) -> bytes:
    """A PROXY-9-format SSE error event."""
    return b"data: " + error_body(kind, code, message) + b"\n\n"


class _Prefix(Protocol):
    """Collects up to ``limit`` bytes of a body, then stops the transfer."""

    def __init__(self, limit: int, done: Deferred) -> None:
        self.limit, self.done, self.data = limit, done, b""
        self.transport = None

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < self.limit:
            self.data += data[:self.limit - len(self.data)]
            if len(self.data) >= self.limit and self.transport is not None:
                self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(self.data)


class LoadingProgress:
    """The loading-state stream of one request.

    :param app: the web layer's ``WebContext`` (router, forwarder, clock).
    :param request: the twisted.web request (nothing written to it yet).
    :param model_id: the resolved id (shown in ``loading model <id>…``).
    :param requested: the name the client asked for (the chunks' ``model``).
    :param waiting: the not-yet-fired Deferred from ``router.acquire``.
    """

    def __init__(self, app: Any, request: Any, model_id: str, requested: str, waiting: Deferred) -> None:
        self.app = app
        self.request = request
        self.model_id = model_id
        self.requested = requested
        self.waiting = waiting
        self.clock = app.clock
        self.admitted = self.clock.seconds()
        self._position = 1
        self._admission = -1
        self._dot = None
        self._listening = False

    # -- while waiting ------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if not self.request.client_gone and not self.request.finished:
            self.request.write(loading_chunk(self.requested, text, int(self.clock.seconds())))

    def _begin(self) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"x-accel-buffering", b"no")
        request.setHeader(b"cache-control", b"no-cache")
        self._say(f"loading model {self.model_id}\u2026\n")
        place = self.app.router.place(self.waiting)  # asked once; the events tell the rest
        if place is not None:
            self._admission = place.admission
            self._show_position(place.position)
            self.app.router.observers.add(self._observe)
            self._listening = True
        self._dot = self.clock.callLater(DOT_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._dot = None
        self._say(".")
        self._dot = self.clock.callLater(DOT_INTERVAL, self._tick)

    def _observe(self, event: ModelEvent) -> None:
        """``IModelObserver``: each earlier request that stopped waiting moves us up one."""
        if isinstance(event, QueueChanged) and event.left:
            ahead = sum(1 for admission in event.left if admission < self._admission)
            if ahead:
                self._show_position(self._position - ahead)

    def _show_position(self, position: int) -> None:
        if position != self._position:
            self._position = position
            self._say(f"waiting in queue (position {position})\n")

    def _stop(self) -> None:
        if self._dot is not None and self._dot.active():
            self._dot.cancel()
        self._dot = None
        if self._listening:
            self._listening = False
            self.app.router.observers.remove(self._observe)

    async def wait(self) -> Any:
        """Stream progress until the lease is granted; return it, or None after writing the
        failure as an SSE error event (the response is then finished)."""
        self._begin()
        try:
            lease = await self.waiting
        except CancelledError:
            self._stop()
            raise
        except Exception as e:
            self._stop()
            if isinstance(e, LlamaSwapError):
                self.fail(e.kind, e.code, e.message)
            else:
                self.app.log.failure("waiting for {model} failed", Failure(), model=self.model_id)
                self.fail("server_error", "internal_error", "internal error")
            return None
        self._stop()
        self._say(f"\nmodel ready ({self.clock.seconds() - self.admitted:.2f}s)\n\n")
        return lease

    def fail(self, kind: str, code: str, message: str) -> None:
        request = self.request
        if request.client_gone or request.finished:
            return
        request.write(error_event(kind, code, message))
        request.finish()

    # -- once granted ------------------------------------------------------------------------------

    async def relay(self, *, http: Any, request: Any, url: bytes, headers: Any, body: Callable[[], Any],
                    model_id: str, still_ready: Callable[[], bool],
                    on_headers: Optional[Callable[[Any], None]] = None,
                    on_data: Optional[Callable[[bytes], None]] = None) -> RelayOutcome:
        """Like ``Forwarder.forward``, onto the already-started SSE response."""
        forwarder = self.app.forwarder
        try:
            response = await forwarder.send(request, http=http, url=url, headers=headers, body=body,
                                            model_id=model_id, still_ready=still_ready)
        except LlamaSwapError as e:
            self.fail("server_error", "upstream_error", e.message)
            return RelayOutcome(200, 0, False, e.message)
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if not 200 <= response.code < 300 or not ctype.lower().startswith(b"text/event-stream"):
            done: Deferred = Deferred(lambda d: prefix.transport and prefix.transport.stopProducing())
            prefix = _Prefix(ERROR_BODY_LIMIT, done)
            response.deliverBody(prefix)
            text = (await done).decode("utf-8", "replace")
            message = (f"upstream for model '{model_id}' answered {response.code} "
                       f"({ctype.decode('latin-1') or 'no content type'}) instead of an event stream: {text}")
            self.fail("server_error", "upstream_error", message)
            return RelayOutcome(200, 0, False, message)
        if on_headers is not None:
            on_headers(response)
        # the loading chunks ended with a blank line
        return await forwarder.relay(request, response, model_id=model_id, sse=True, on_data=on_data,
                                     status=200, tail=b"\n\n")
