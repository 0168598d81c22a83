"""The web UI behind a key that is no admin's, in a real headless Chromium (see test_ui_browser.py
for how Chromium is found and driven): the admin actions are hidden (load, unload, unload all,
the logs, the upstream links) and the rest still works live; behind the admin key they show."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon import Daemon, fake_cmd, free_port_range, stop_and_clean
from tests.test_ui_browser import CHROMIUM, TIMEOUT_MS, _launch, _open_ui

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

ADMIN, VIEWER = "sk-ui-admin-1b2c", "sk-ui-viewer-3d4e"


@pytest.fixture
def daemon(tmp_path):
    config = {
        "healthCheckTimeout": 15, "unloadTimeout": 2, "startPort": free_port_range(3),
        "apiKeys": [ADMIN, {"key": VIEWER, "name": "viewer", "models": ["chat-*"], "admin": False}],
        "models": {
            "chat-a": {"cmd": fake_cmd("chat-a", respond="from chat-a"), "description": "chat"},
            "other": {"cmd": fake_cmd("other", respond="from other")},
        },
    }
    (tmp_path / "daemon").mkdir()
    d = Daemon(config, tmp_path / "daemon").start()
    yield d
    problems = stop_and_clean(d, strict=True)
    assert not problems, problems


def test_ui_behind_a_non_admin_key_hides_admin_actions(daemon, tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        context = _launch(p, tmp_path, http_credentials={"username": "me", "password": VIEWER})
        try:
            page, errors = _open_ui(context, daemon)
            rows = page.locator("#models tbody tr[data-model]")
            expect(rows).to_have_count(2, timeout=TIMEOUT_MS)
            expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)
            expect(page.locator("#whoami")).to_have_text("key: viewer (read-only)")
            # the admin actions are gone
            expect(page.locator("#unload-all")).to_be_hidden()
            expect(page.locator("#logs-section")).to_be_hidden()
            expect(page.locator("button.load")).to_have_count(0)
            expect(page.locator("button.unload")).to_have_count(0)
            expect(page.locator('header nav a[href="/upstream"]')).to_be_hidden()
            # ... and the page still works: a request of this key shows up live, state and all
            chat_a = page.locator('tr[data-model="chat-a"]')
            status, body = daemon.json("POST", "/v1/chat/completions", {"model": "chat-a", "messages": []},
                                       headers={"Authorization": f"Bearer {VIEWER}"})
            assert status == 200, body
            daemon.record_children()
            expect(chat_a.locator(".state")).to_have_text("ready", timeout=TIMEOUT_MS)
            expect(chat_a.locator("a.open")).to_have_count(0)
            first = page.locator("#requests tbody tr[data-id]").first
            expect(first).to_contain_text("chat-a", timeout=TIMEOUT_MS)
            expect(first).to_contain_text("200")
            page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
            assert not errors, errors
        finally:
            context.close()

    # the same page behind the admin key keeps every action
    with sync_playwright() as p:
        context = _launch(p, tmp_path / "admin", http_credentials={"username": "me", "password": ADMIN})
        try:
            page, errors = _open_ui(context, daemon)
            expect(page.locator("#models tbody tr[data-model]")).to_have_count(2, timeout=TIMEOUT_MS)
            expect(page.locator("#whoami")).to_have_text("key: key1")
            expect(page.locator("#unload-all")).to_be_visible()
            expect(page.locator("#logs-section")).to_be_visible()
            expect(page.locator('tr[data-model="other"] button.load')).to_be_visible()
            expect(page.locator("#log")).to_contain_text("chat-a: starting -> ready", timeout=TIMEOUT_MS)
            assert not errors, errors
        finally:
            context.close()
