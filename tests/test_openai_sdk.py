"""The official ``openai`` Python SDK against a real daemon and fake upstreams.

Checks that what llamaswap relays is something the SDK parses: plain and
streamed chat completions, the model list, and the OpenAI error envelope.
"""
from __future__ import annotations

import openai
import pytest

from tests.daemon import Daemon, fake_cmd, free_port_range

RESPOND = "Hello from the fake"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    cfg = {
        "healthCheckTimeout": 15,
        "startPort": free_port_range(4),
        "unloadTimeout": 2,
        "models": {
            "gpt-fake": {"cmd": fake_cmd("gpt-fake", "--chunks", "4", respond=RESPOND), "aliases": ["gpt-4o-mini"]},
            "other": {"cmd": fake_cmd("other", respond="other answer")},
        },
    }
    d = Daemon(cfg, tmp_path_factory.mktemp("openai"))
    d.start()
    yield d
    try:
        d.stop()
    finally:
        d.kill()
        print(d.output())


@pytest.fixture(scope="module")
def client(daemon):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="x", max_retries=0,
                       timeout=30) as c:
        yield c


def test_chat_completion(client):
    """A non-streamed chat completion returns the fake's text."""
    completion = client.chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == RESPOND
    assert completion.model == "gpt-fake"
    assert completion.usage.prompt_tokens == 25 and completion.usage.completion_tokens == 10


def test_chat_completion_via_alias(client):
    """An alias works as the SDK's model name."""
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == RESPOND


def test_streamed_chat_completion(client):
    """A streamed chat completion yields several chunks that join to the fake's text."""
    stream = client.chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    pieces = []
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) == 4
    assert "".join(pieces) == RESPOND
    assert usage is not None and usage.completion_tokens == 10


def test_swap_between_models(client):
    """Consecutive requests for different models each get their own model's answer."""
    for model, text in (("other", "other answer"), ("gpt-fake", RESPOND), ("other", "other answer")):
        completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "q"}])
        assert completion.choices[0].message.content == text


def test_models_list(client):
    """models.list() returns the configured ids."""
    assert sorted(m.id for m in client.models.list()) == ["gpt-fake", "other"]


def test_unknown_model_error(client):
    """An unknown model surfaces as openai.NotFoundError with code model_not_found."""
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
