"""A model's ``hooks.beforeStop`` and ``hooks.afterReady``: HTTP calls to its own server.

They are how a user drives a server's own sleep, wake or cache endpoints around llamaswap's
planned stops and starts (vLLM's ``/sleep`` and ``/wake_up``, llama-server's ``/slots``):
:mod:`llamaswap.kvcache` runs them, after its own save and restore, through the model's
per-child client.

Each call is bounded by its ``timeout`` (answer included, on the injected clock). A call that
fails, answers something other than 2xx or runs out of time is logged, and the next one runs:
a hook never fails a start or holds a stop beyond its bound. Bodies and answers are never
logged.

:func:`send_json` is the one small JSON request both this module and ``kvcache`` make.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Optional

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web.client import ResponseFailed

from llamaswap.config.keepcache import Hook

__all__ = ["TimedOut", "bounded", "call_hooks", "describe_failure", "send_json"]

#: an answer larger than this is not parsed (nor kept): these calls answer a few hundred bytes
MAX_ANSWER = 1024 * 1024


async def send_json(http: Any, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """``method url`` with ``body`` as JSON (when not None); ``(status, parsed answer or None)``.

    :param http: a treq-like client (the model's per-child ``proc.http``).
    """
    headers = {b"content-type": [b"application/json"]} if body is not None else None
    data = json.dumps(body).encode("utf-8") if body is not None else None
    try:
        response = await http.request(method, url, data=data, headers=headers, allow_redirects=False)
        content = await response.content()
    except ResponseFailed as e:
        # A cancelled request fails with ResponseNeverReceived([CancelledError]): say so, so that
        # the callers' cancellation (a bound, an abandoned start) is recognised as one.
        if any(getattr(reason, "check", lambda *_: None)(CancelledError) for reason in e.reasons):
            raise CancelledError() from None
        raise
    if len(content) > MAX_ANSWER:
        return response.code, None
    try:
        return response.code, json.loads(content) if content else None
    except ValueError:
        return response.code, None


class TimedOut(Exception):
    """A :func:`bounded` call ran out of time."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"did not finish within {seconds:g}s")
        self.seconds = seconds


async def bounded(clock: Any, seconds: float, work: Any) -> Any:
    """Await the coroutine ``work`` for at most ``seconds`` of ``clock``; return its result.

    :raises TimedOut: when the bound cut it short (``work`` was cancelled).
    :raises CancelledError: when the caller cancelled.
    """
    d: Deferred = ensureDeferred(work)
    expired: list = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    call = clock.callLater(seconds, expire)
    try:
        return await d
    except Exception:
        if expired:
            raise TimedOut(seconds) from None
        raise
    finally:
        if call.active():
            call.cancel()


def answer_message(answer: Any) -> str:
    """The ``error.message`` of a llama-server-style error answer, else ""."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        message = answer["error"].get("message")
        if isinstance(message, str):
            return message[:200]
    return ""


def describe_failure(error: BaseException) -> str:
    """A short reason for a failed call, for the log."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def call_hooks(http: Any, clock: Any, base_url: str, hooks: Iterable[Hook], model_id: str,
                     when: str, log: Logger) -> int:
    """Make each call of ``hooks`` in order against ``base_url``; return how many answered 2xx.

    :param when: ``beforeStop`` or ``afterReady``, for the log lines.
    :raises CancelledError: when the caller cancels (the stop or start was abandoned).
    """
    answered = 0
    for hook in hooks:
        if await _call(http, clock, base_url, hook, model_id, when, log):
            answered += 1
    return answered


async def _call(http: Any, clock: Any, base_url: str, hook: Hook, model_id: str, when: str,
                log: Logger) -> bool:
    started = clock.seconds()
    url = base_url.rstrip("/") + hook.path
    fields = dict(model=model_id, when=when, method=hook.method, path=hook.path)
    try:
        status, answer = await bounded(clock, hook.timeout, send_json(http, hook.method, url, hook.body))
    except CancelledError:
        raise
    except TimedOut:
        log.warn("{model}: {when} hook {method} {path} did not answer within {timeout}s",
                 timeout=hook.timeout, **fields)
        return False
    except Exception as e:
        log.warn("{model}: {when} hook {method} {path} failed: {why}", why=describe_failure(e), **fields)
        return False
    seconds = clock.seconds() - started
    if 200 <= status < 300:
        log.info("{model}: {when} hook {method} {path} answered {status} in {seconds:.3f}s",
                 status=status, seconds=seconds, **fields)
        return True
    message: Optional[str] = answer_message(answer)
    log.warn("{model}: {when} hook {method} {path} answered {status}{why}", status=status,
             why=f" ({message})" if message else "", **fields)
    return False
