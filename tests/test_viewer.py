"""The run viewer (service/http/static/) in a real headless Chromium, against a real server's HTTP face: a demo run
drawn live and across a reload mid-run (every seq once), hostile text shown as text, breaker and dead-letter marks,
and a run started over gRPC opened by id. Debian's chromium, driven by Playwright (never `playwright install`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect
from starlette.applications import Starlette
from starlette.testclient import TestClient

from agent.v1 import agent_pb2 as pb
from conftest import make_config, stub
from fake_tools import policy_tools
from service.callers import token_hash
from service.http import viewer
from service.rpc.server import Service
from service.wiring import start

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
DOCS_SHOT = Path(__file__).parent.parent / "docs" / "viewer.png"
WAIT_MS = 15_000  # a generous bound on a loaded CI machine; the demo run itself takes about 3.5 s


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM and not os.environ.get("CI"):  # CI installs it (.ci/run): fails there instead
        pytest.skip("Debian's chromium is not installed (apt-get install chromium chromium-driver)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    await context.close()
    assert not errors, f"the page's script failed: {errors}"


def base_url(svc: Service) -> str:
    return f"http://127.0.0.1:{svc.http_port}"


async def seqs_drawn(page: Page) -> list[tuple[int, int]]:
    """The (first, last) seq of each event row, in the order drawn."""
    rows = await page.eval_on_selector_all(
        "#events li", "rows => rows.map(r => [Number(r.dataset.firstSeq), Number(r.dataset.seq)])"
    )
    return [(first, last) for first, last in rows]


def assert_each_seq_once(rows: list[tuple[int, int]], last_seq: int) -> None:
    covered = [seq for first, last in rows for seq in range(first, last + 1)]
    assert covered == list(range(1, last_seq + 1)), rows


async def test_a_demo_run_is_drawn_live_and_survives_a_reload(page: Page, tmp_path: Path) -> None:
    svc = await start(make_config(tmp_path, http_listen="127.0.0.1:0"), metrics=False)  # the demo model and tools
    try:
        resumed_from: list[str | None] = []
        page.on(
            "request",
            lambda r: resumed_from.append(r.headers.get("last-event-id")) if r.url.endswith("/events") else None,
        )
        await page.goto(base_url(svc) + "/")
        await expect(page.locator("#tools")).to_contain_text("shipment_tracker", timeout=WAIT_MS)
        await page.fill("#message", "Which shipments are late?")
        await page.click("#start")

        # Mid-run: a tool call has begun and the answer has not come yet.
        await expect(page.locator(".call").first).to_be_visible(timeout=WAIT_MS)
        assert await page.locator("#final").is_hidden()
        run_id = (await page.text_content("#run-id")) or ""
        assert page.url.endswith(f"#run={run_id}")
        await page.reload()

        final = page.locator("#answer .final-turn")
        await expect(final).to_contain_text("Here is what the tools returned", timeout=WAIT_MS)
        await expect(page.locator("#run-state")).to_have_text("succeeded")
        await expect(page.locator("#conn")).to_have_text("ended")

        names = await page.locator(".call .name").all_text_contents()
        assert {"query_database", "search_documents", "shipment_tracker"} <= set(names)
        assert await page.locator(".call-log .retry").count() >= 2  # the carrier API's 502 and 503s
        await expect(page.locator(".call-log .fallback")).to_contain_text("tracking_snapshot")
        await expect(page.locator(".call-log .result").first).to_contain_text(" ms")
        assert await page.locator(".call .status-ok").count() == len(names)
        assert "Let me look at the shipment data" in (await page.text_content("#answer") or "")

        # Every seq once, across the reload; the page after it asked only for what came after its last seq.
        last_seq = svc.registry.get(run_id).record().last_seq
        assert_each_seq_once(await seqs_drawn(page), last_seq)
        assert resumed_from[0] is None and len(resumed_from) >= 2 and int(resumed_from[1] or 0) > 0
        await page.screenshot(path=tmp_path / "viewer.png", full_page=True)
        if os.environ.get("UPDATE_SCREENSHOT"):  # `make screenshot`: the README's image
            shutil.copy(tmp_path / "viewer.png", DOCS_SHOT)
    finally:
        await svc.server.stop(0)
        await svc.close()


async def test_a_dropped_stream_is_resumed_after_the_last_seq_drawn(start_service: Any, page: Page) -> None:
    svc = await start_service(http_listen="127.0.0.1:0")
    asked_after: list[str | None] = []

    async def drop_the_first_stream_after_five_events(route: Route) -> None:
        asked_after.append(route.request.headers.get("last-event-id"))
        if len(asked_after) > 1:
            await route.continue_()
            return
        response = await route.fetch()  # the unpaced run ends at once, so this is the whole stream
        frames = (await response.text()).split("\n\n")
        await route.fulfill(response=response, body="\n\n".join(frames[:5]) + "\n\n")

    await page.route("**/events", drop_the_first_stream_after_five_events)
    await page.goto(base_url(svc) + "/")
    await page.click("#start")
    await expect(page.locator("#answer .final-turn")).to_contain_text("The answer:", timeout=WAIT_MS)
    run_id = (await page.text_content("#run-id")) or ""
    assert asked_after == [None, "5"]
    assert_each_seq_once(await seqs_drawn(page), svc.registry.get(run_id).record().last_seq)


SLOW = [{"tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]}, {"text": "never"}]
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"><b>bold</b>"
# The first call fails twice (one retry), which opens flaky's breaker and dead-letters it; the second is refused.
FAILING = [
    {"text": f"Trying {HOSTILE}", "tool_calls": [{"name": "flaky", "input": {"text": HOSTILE}}]},
    {"text": "Again.", "tool_calls": [{"name": "flaky", "input": {"text": "again"}}]},
    {"text": "The answer: {results}"},
]


async def test_hostile_text_is_shown_as_text_and_breakers_and_dead_letters_are_marked(
    start_service: Any, page: Page, tmp_path: Path
) -> None:
    policies = {"flaky": {"retry": {"attempts": 2, "initial_backoff_s": 0.001}, "breaker": {"failure_threshold": 2}}}
    svc = await start_service(FAILING, tools=policy_tools(failures=99), policies=policies, http_listen="127.0.0.1:0")
    await page.goto(base_url(svc) + "/")
    await page.fill("#message", "<script>document.title='pwned'</script>")
    await page.click("#start")
    await expect(page.locator("#run-state")).to_have_text("succeeded", timeout=WAIT_MS)

    assert f"Trying {HOSTILE}" in (await page.locator("#answer").text_content() or "")
    assert await page.locator("#answer img, #answer b, .call img, .call b, #events img").count() == 0
    assert json.dumps(HOSTILE) in (await page.locator(".call .input").first.text_content() or "")  # as JSON text
    assert await page.title() != "pwned"

    await expect(page.locator(".call-log .retry")).to_have_count(1)
    await expect(page.locator(".call.deadletter .call-head .mark.deadletter")).to_have_count(1)
    await expect(page.locator(".call-log .deadletter").first).to_contain_text("dead letter exec_")
    await expect(page.locator(".call.breaker .call-head .mark.breaker")).to_have_text(["breaker open"])
    await expect(page.locator("#events .ev-execution_failed .mark.deadletter").first).to_be_visible()
    await page.screenshot(path=tmp_path / "marks.png", full_page=True)


async def test_a_run_started_over_grpc_is_opened_by_id(
    start_service: Any, channel_to: Any, page: Page, tmp_path: Path
) -> None:
    svc = await start_service(http_listen="127.0.0.1:0")
    submitted = await stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="hello", tools=["echo"]))
    await page.goto(base_url(svc) + "/")
    await page.fill("#open-id", submitted.run_id)
    await page.click("#open")
    await expect(page.locator("#answer .final-turn")).to_contain_text("The answer:", timeout=WAIT_MS)
    await expect(page.locator(".call .name")).to_have_text(["echo"])
    assert page.url.endswith(f"#run={submitted.run_id}")

    await page.goto(base_url(svc) + "/#run=run_unknown")
    await expect(page.locator("#notice")).to_contain_text("NOT_FOUND", timeout=WAIT_MS)


async def test_cancel_run_stops_the_running_tool_and_ends_the_run(start_service: Any, page: Page) -> None:
    svc = await start_service(SLOW, http_listen="127.0.0.1:0")
    await page.goto(base_url(svc) + "/")
    await page.click("#start")
    await expect(page.locator(".call .status")).to_have_text(["running"], timeout=WAIT_MS)
    await page.click("#cancel")
    await expect(page.locator("#run-state")).to_have_text("cancelled", timeout=WAIT_MS)
    await expect(page.locator(".call .status")).to_have_text(["cancelled"])
    await expect(page.locator("#final")).to_contain_text("Error CANCELLED")
    await expect(page.locator("#cancel")).to_be_disabled()


async def test_the_token_field_authenticates_every_call_across_a_reload(start_service: Any, page: Page) -> None:
    callers = [{"name": "ops", "token_sha256": [token_hash("s3cret")], "tools": ["echo"]}]
    svc = await start_service(auth={"required": True, "callers": callers}, http_listen="127.0.0.1:0")
    sent: list[str | None] = []
    page.on("request", lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
    await page.goto(base_url(svc) + "/")
    await expect(page.locator("#notice")).to_contain_text("tools: UNAUTHENTICATED", timeout=WAIT_MS)

    await page.fill("#token", "s3cret")
    await page.locator("#token").blur()
    await expect(page.locator("#tools label")).to_have_text(["echo"], timeout=WAIT_MS)  # this caller's tools
    await expect(page.locator("#notice")).to_be_hidden()
    await page.click("#start")
    await expect(page.locator("#answer .final-turn")).to_contain_text("The answer:", timeout=WAIT_MS)

    await page.reload()  # the token is kept for the tab, and the run redrawn from it without a new call
    await expect(page.locator("#token")).to_have_value("s3cret")
    await expect(page.locator("#answer .final-turn")).to_contain_text("The answer:", timeout=WAIT_MS)
    assert sent[0] is None and set(sent[1:]) == {"Bearer s3cret"} and len(sent) >= 4, sent


def test_the_page_and_its_files_are_served_with_a_strict_content_security_policy() -> None:
    client = TestClient(Starlette(routes=viewer.routes()))
    scripts = sorted(viewer.STATIC.glob("*.js"))
    assert {p.name for p in scripts} == {"client.js", "run.js", "viewer.js"}
    for path, kind in [("/", "text/html"), ("/static/viewer.css", "text/css")] + [
        (f"/static/{p.name}", "text/javascript") for p in scripts
    ]:
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/../viewer.py").status_code == 404
    # the script never hands untrusted text to the HTML parser
    for script in scripts:
        text = script.read_text()
        assert not any(sink in text for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"))
