"""The web UI in a real headless Chromium against the real daemon (UI-1..UI-4).

The daemon runs as users run it (tests/daemon.py) with fake upstreams; Chromium is Debian's
``chromium`` driven by Playwright (``pip install playwright``; its own browser download is
never used: ``executable_path`` points at the system browser). The test skips only when no
Chromium binary is found (``.ci/run`` installs one); set ``LLAMASWAP_CHROMIUM`` to use
another binary.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, fake_cmd, free_port_range, stop_and_clean

CHROMIUM = os.environ.get("LLAMASWAP_CHROMIUM") or next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
     if p and os.path.exists(p)), None)
# Flags this machine needs: no sandbox as root, and no background connections to Google's
# hosts (they are refused here, many at a time).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 20_000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


def _config(**top: Any) -> dict[str, Any]:
    return {
        **top,
        "healthCheckTimeout": 15, "unloadTimeout": 2, "startPort": free_port_range(4),
        "models": {
            "alpha": {"cmd": fake_cmd("alpha", "--load-delay", "0.3", respond="from alpha"),
                      "name": "Alpha 7B", "description": "general chat", "aliases": ["gpt-4o-mini"]},
            "beta": {"cmd": fake_cmd("beta", respond="from beta"), "description": "embeddings"},
            "hidden": {"cmd": fake_cmd("hidden"), "unlisted": True},
        },
    }


def _launch(p: Any, tmp_path: Path, **kw: Any) -> Any:
    return p.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 1000}, **kw)


def _open_ui(context: Any, daemon: Daemon) -> tuple[Any, list[str]]:
    """The context's page, at the daemon's /ui/, and the list its page errors go to."""
    page = context.pages[0] if context.pages else context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(daemon.url("/ui/"))
    return page, errors


@pytest.fixture
def daemon(request, tmp_path):
    (tmp_path / "daemon").mkdir()
    d = Daemon(_config(**getattr(request, "param", {})), tmp_path / "daemon")
    d.start()
    yield d
    problems = stop_and_clean(d, strict=True)
    assert not problems, problems


def test_ui_load_logs_requests_unload(daemon, tmp_path: Path):
    """In Chromium: the models appear, Load makes alpha ready (with a link), its log lines and a
    finished request show up live, and Unload stops it again."""
    from playwright.sync_api import expect, sync_playwright

    screenshot = tmp_path / "ui.png"
    with sync_playwright() as p:
        context = _launch(p, tmp_path)
        try:
            page, errors = _open_ui(context, daemon)

            rows = page.locator("#models tbody tr[data-model]")
            expect(rows).to_have_count(3, timeout=TIMEOUT_MS)
            alpha = page.locator('tr[data-model="alpha"]')
            expect(alpha.locator(".state")).to_have_text("stopped")
            expect(alpha).to_contain_text("Alpha 7B")
            expect(alpha).to_contain_text("gpt-4o-mini")
            expect(page.locator('tr[data-model="hidden"] .tag')).to_have_text("unlisted")
            expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)

            alpha.locator("button.load").click()
            expect(alpha.locator(".state")).to_have_text("ready", timeout=TIMEOUT_MS)
            expect(alpha.locator("a.open")).to_have_attribute("href", "/upstream/alpha/props")
            daemon.record_children()

            # Live log output: the combined view shows the fake's startup line and the proxy's
            # state changes as they arrive.
            log = page.locator("#log")
            expect(log).to_contain_text("alpha: starting -> ready", timeout=TIMEOUT_MS)
            expect(log).to_contain_text("listening on http://127.0.0.1", timeout=TIMEOUT_MS)
            page.select_option("#log-source", "alpha")
            expect(log).to_contain_text("listening on http://127.0.0.1", timeout=TIMEOUT_MS)
            expect(log).not_to_contain_text("[INFO]")

            # A finished request appears in the recent-requests table, with its tokens.
            status, body = daemon.chat("alpha")
            assert status == 200, body
            first = page.locator("#requests tbody tr[data-id]").first
            expect(first).to_contain_text("alpha", timeout=TIMEOUT_MS)
            expect(first).to_contain_text("/v1/chat/completions")
            expect(first).to_contain_text("200")
            expect(first).to_contain_text("25")  # tokens in (the fake's timings.prompt_n)
            expect(log).to_contain_text("POST /v1/chat/completions", timeout=TIMEOUT_MS)

            page.screenshot(path=str(screenshot), full_page=True)

            alpha.locator("button.unload").click()
            expect(alpha.locator(".state")).to_have_text("stopped", timeout=TIMEOUT_MS)
            expect(alpha.locator("a.open")).to_have_count(0)
            assert not errors, errors
        finally:
            context.close()
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


@pytest.mark.parametrize("daemon", [{"apiKeys": ["sekret-key"]}], indirect=True)
def test_ui_with_basic_auth(daemon, tmp_path: Path):
    """UI-5/SEC-2: with apiKeys the UI works through Basic credentials (the browser's prompt),
    event stream and log stream included; without them the UI is refused."""
    from playwright.sync_api import expect, sync_playwright

    assert daemon.request("GET", "/ui/").status == 401
    with sync_playwright() as p:
        context = _launch(p, tmp_path, http_credentials={"username": "me", "password": "sekret-key"})
        try:
            page, _ = _open_ui(context, daemon)
            beta = page.locator('tr[data-model="beta"]')
            expect(beta.locator(".state")).to_have_text("stopped", timeout=TIMEOUT_MS)
            expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)
            beta.locator("button.load").click()
            expect(beta.locator(".state")).to_have_text("ready", timeout=TIMEOUT_MS)
            daemon.record_children()
            expect(page.locator("#log")).to_contain_text("beta: starting -> ready", timeout=TIMEOUT_MS)
            page.locator("#unload-all").click()
            expect(beta.locator(".state")).to_have_text("stopped", timeout=TIMEOUT_MS)
            expect(page.locator("#notice")).to_have_text("all models unloaded")
        finally:
            context.close()


def test_ui_memory_budget_bar(tmp_path: Path):
    """With memory.budget set (and apiKeys, so through Basic credentials): once two models are
    loaded, the memory bar shows the budget, each model's share with its need and where the
    number comes from (declared here), and what is left free; unloading one gives its share back."""
    from playwright.sync_api import expect, sync_playwright

    gib = 2**30
    config = {
        "apiKeys": ["sekret-key"], "memory": {"budget": "16GiB", "overhead": 0},
        "healthCheckTimeout": 15, "unloadTimeout": 2, "startPort": free_port_range(2),
        "models": {
            "alpha": {"cmd": fake_cmd("alpha", respond="from alpha"), "memory": "6GiB"},
            "beta": {"cmd": fake_cmd("beta", respond="from beta"), "memory": "4GiB"},
        },
    }
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(config, tmp_path / "daemon").start()
    try:
        with sync_playwright() as p:
            context = _launch(p, tmp_path, http_credentials={"username": "me", "password": "sekret-key"})
            try:
                page, errors = _open_ui(context, daemon)
                section = page.locator("#memory-section")
                expect(section).to_be_visible(timeout=TIMEOUT_MS)   # a budget, nothing loaded yet
                expect(section.locator("#memory-summary")).to_contain_text("of 16.0 GiB")
                expect(section.locator(".mem-share")).to_have_count(0)

                for model in ("alpha", "beta"):
                    row = page.locator(f'tr[data-model="{model}"]')
                    row.locator("button.load").click()
                    expect(row.locator(".state")).to_have_text("ready", timeout=TIMEOUT_MS)
                daemon.record_children()
                status, body = daemon.json("GET", "/running",
                                           headers={"Authorization": "Bearer sekret-key"})
                assert status == 200 and body["memory_budget"] == 16 * gib, body
                assert {m["model"]: m["memory"] for m in body["running"]} == {"alpha": 6 * gib, "beta": 4 * gib}

                shares = section.locator("#memory-bar .mem-share")
                expect(shares).to_have_count(2, timeout=TIMEOUT_MS)
                for model, size in (("alpha", "6.0 GiB"), ("beta", "4.0 GiB")):
                    item = section.locator(f'#memory-legend li[data-model="{model}"]')
                    expect(item.locator(".size")).to_have_text(size)
                    expect(item.locator(".source")).to_have_text("declared")
                expect(section.locator("#memory-legend li.free .size")).to_have_text("6.0 GiB")
                expect(section.locator("#memory-summary")).to_have_text("10.0 GiB of 16.0 GiB budget in use")
                # the shares are drawn to scale: alpha's segment is 6/16 of the bar
                bar = section.locator("#memory-bar").bounding_box()
                alpha = section.locator('#memory-bar .mem-share[data-model="alpha"]').bounding_box()
                assert abs(alpha["width"] / bar["width"] - 6 / 16) < 0.02, (alpha, bar)
                page.screenshot(path=str(tmp_path / "memory.png"), full_page=True)

                beta = page.locator('tr[data-model="beta"]')
                beta.locator("button.unload").click()
                expect(beta.locator(".state")).to_have_text("stopped", timeout=TIMEOUT_MS)
                expect(shares).to_have_count(1, timeout=TIMEOUT_MS)
                expect(section.locator("#memory-legend li.free .size")).to_have_text("10.0 GiB")
                assert not errors, errors
            finally:
                context.close()
    finally:
        problems = stop_and_clean(daemon, strict=True)
    assert not problems, problems
