"""The chat page in a real browser: Debian's headless Chromium driven by Playwright, against a
real server and a real gateway (local backend), turns through the real SDK and CLI against the
local model.

Each test drives the page as a person would (labelled fields, Enter to send, buttons by name)
and checks what is on screen. Screenshots of the main states go to ``test-artifacts/chat-page/``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Page, Playwright, expect, sync_playwright

from hosting.web import CONTENT_SECURITY_POLICY
from tests.support import ROOT
from tests.support.gateways import ALICE, Gateways, auth, open_turn
from tests.support.servers import LocalModel, ServerProcess, agent_env

pytestmark = pytest.mark.e2e

SERVER_TOKEN = "chat-page-server-token-3c9d"
ARTIFACTS = ROOT / "test-artifacts" / "chat-page"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
TURN_TIMEOUT_MS = 90_000


@dataclass(frozen=True)
class Front:
    """Where the page is served and the token its API calls need."""

    name: str
    base_url: str
    token: str


@pytest.fixture(scope="module")
def server(local_model: LocalModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("chat-server") / "data"
    # AGENT_API_DOCS: the API page is tried in this browser too (test_the_api_page_renders_from_its_own_origin).
    process = ServerProcess(agent_env(local_model, data_dir, AGENT_AUTH_TOKEN=SERVER_TOKEN, AGENT_PREWARM="1",
                                      AGENT_API_DOCS="1"), data_dir)
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def gateways(local_model: LocalModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    factory = Gateways(local_model, tmp_path_factory.mktemp("chat-gateway"), "local", None)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def gateway_url(gateways: Gateways) -> str:
    # One pre-started CLI per sandbox (the default is sized for serving) keeps the pool quick to fill.
    return gateways.start(AGENT_PREWARM="1", GATEWAY_SANDBOX_ENV="AGENT_PREWARM").base_url


@pytest.fixture(params=["server", "gateway"])
def front(request: pytest.FixtureRequest, server: ServerProcess) -> Front:
    if request.param == "server":
        return Front("server", server.base_url, SERVER_TOKEN)
    return Front("gateway", request.getfixturevalue("gateway_url"), ALICE)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        browser.close()


@dataclass
class Watched:
    """A page plus what it did that it must not: dialogs opened, script errors thrown."""

    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self, base_url: str, token: str) -> Page:
        self.page.goto(f"{base_url}/")
        self.page.get_by_label("Token").fill(token)
        return self.page

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 900, "height": 900})
    page = context.new_page()
    watched = Watched(page)

    def on_dialog(dialog: Dialog) -> None:
        watched.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    try:
        yield watched
    finally:
        context.close()
    assert watched.errors == [], watched.errors


def send(page: Page, prompt: str) -> None:
    page.get_by_label("Message").fill(prompt)
    page.get_by_label("Message").press("Enter")


def wait_turn_done(page: Page, index: int) -> None:
    """Wait until turn ``index`` shows its final line (cost and duration) and Send is back."""
    expect(page.locator(".turn").nth(index).locator(".result")).to_have_count(1, timeout=TURN_TIMEOUT_MS)
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=TURN_TIMEOUT_MS)


# -- the page itself ----------------------------------------------------------------------


@pytest.mark.parametrize("path,media_type", [("/", "text/html"), ("/chat/chat.js", "text/javascript"),
                                             ("/chat/chat.css", "text/css")])
def test_page_and_assets_are_served_without_auth_under_the_csp(front: Front, path: str, media_type: str) -> None:
    response = httpx.get(f"{front.base_url}{path}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{front.base_url}/sessions/any/events").status_code == 401, "the API still needs the token"


def test_csp_stops_injected_inline_script_and_foreign_requests(server: ServerProcess, watched: Watched) -> None:
    page = watched.open(server.base_url, SERVER_TOKEN)
    outcome = page.evaluate("""async () => {
        const violations = [];
        document.addEventListener("securitypolicyviolation", (e) => violations.push(e.violatedDirective));
        const script = document.createElement("script");
        script.textContent = "window.injectedRan = true";
        document.body.append(script);
        let foreign = "allowed";
        try { await fetch("http://127.0.0.2:9/"); } catch { foreign = "blocked"; }
        await new Promise((resolve) => setTimeout(resolve, 100));
        return { ran: window.injectedRan === true, foreign, violations };
    }""")
    assert outcome["ran"] is False
    assert outcome["foreign"] == "blocked"
    assert "script-src-elem" in outcome["violations"] and "connect-src" in outcome["violations"], outcome


# -- conversations ------------------------------------------------------------------------


def test_two_turn_conversation_remembers_the_first_turn(front: Front, watched: Watched) -> None:
    page = watched.open(front.base_url, front.token)
    value = secrets.token_hex(3)
    prompt = page.get_by_label("Message")
    prompt.fill("first line")
    prompt.press("Shift+Enter")
    prompt.press_sequentially("second line")
    assert prompt.input_value() == "first line\nsecond line", "Shift+Enter adds a line, it does not send"
    assert page.locator(".turn").count() == 0

    send(page, f"Remember this value: {value}")
    wait_turn_done(page, 0)
    send(page, "What value did I ask you to remember?")
    wait_turn_done(page, 1)

    second = page.locator(".turn").nth(1)
    expect(second.locator(".you")).to_have_text("What value did I ask you to remember?")
    expect(second.locator(".text")).to_have_text(f"You asked me to remember {value}.")
    expect(second.locator(".result")).to_have_text(re.compile(r"^Done · \d+\.\d s · cost \$\d+\.\d{4}"))
    session_id = page.get_by_label("Session").input_value()
    assert session_id in page.evaluate("localStorage.getItem('agent.sessions')")
    assert page.evaluate("sessionStorage.getItem('agent.token')") == front.token
    watched.shot(f"conversation-{front.name}")

    page.get_by_role("button", name="New session").click()
    expect(page.locator(".turn")).to_have_count(0)
    assert page.get_by_label("Session").input_value() not in ("", session_id)
    expect(page.locator(f"#known-sessions option[value='{session_id}']")).to_have_count(1)
    page.get_by_label("Session").fill(session_id)
    page.get_by_label("Session").press("Enter")
    replayed = page.locator(".turn")
    expect(replayed).to_have_count(1)
    expect(replayed.locator(".note")).to_have_text(f"Latest turn of session {session_id}:")
    expect(replayed.locator(".text")).to_have_text(f"You asked me to remember {value}.", timeout=30_000)


def test_refusals_are_explained_in_words(gateway_url: str, watched: Watched) -> None:
    page = watched.open(gateway_url, ALICE)
    session_id = page.get_by_label("Session").input_value()
    with open_turn(gateway_url, session_id, "[[delay:60]] another client's long turn", ALICE) as other_client:
        send(page, "a second turn at once")
        expect(page.locator(".turn .error")).to_have_text(re.compile(r"already running on this session \(409 Conflict\)"))
        assert httpx.post(f"{gateway_url}/sessions/{session_id}/interrupt", headers=auth(ALICE)).status_code == 200
        assert other_client.finish()[-1] == "done"

    page.get_by_label("Token").fill("not-a-token")
    send(page, "a turn with a wrong token")
    expect(page.locator(".turn .error").nth(1)).to_have_text(re.compile(r"refused the token \(401 Unauthorized\)"))
    watched.shot("refusals")


def test_tool_call_shows_the_call_and_its_result(server: ServerProcess, watched: Watched) -> None:
    page = watched.open(server.base_url, SERVER_TOKEN)
    send(page, '[[think]] [[tool:WebSearch {"query": "python gil"}]] look it up')
    wait_turn_done(page, 0)
    turn = page.locator(".turn").first
    expect(turn.locator("details.thinking summary")).to_have_text("Thinking")
    expect(turn.locator("details.thinking")).not_to_have_attribute("open", "")
    tool = turn.locator("details.tool")
    expect(tool.locator("summary")).to_have_text("Tool call: WebSearch (done)")
    tool.locator("summary").click()
    expect(tool.locator(".tool-input")).to_contain_text('"query": "python gil"')
    expect(tool.locator(".tool-result")).to_contain_text("Result:")
    expect(tool.locator(".tool-result pre")).to_contain_text("python gil")
    expect(turn.locator(".text")).to_contain_text("Tool WebSearch returned")
    watched.shot("tool-call")


def test_interrupt_ends_the_turn_and_the_page_stays_usable(server: ServerProcess, watched: Watched) -> None:
    page = watched.open(server.base_url, SERVER_TOKEN)
    send(page, "[[delay:60]] take your time")
    interrupt = page.get_by_role("button", name="Interrupt")
    expect(interrupt).to_be_enabled(timeout=TURN_TIMEOUT_MS)
    interrupt.click()
    expect(page.locator(".turn .error")).to_have_text("Interrupted.", timeout=30_000)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(interrupt).to_be_disabled()
    watched.shot("interrupted")

    send(page, "Remember this value: still-here")
    wait_turn_done(page, 1)
    expect(page.locator(".turn").nth(1).locator(".text")).to_have_text("Noted: I will remember still-here.")


def test_wrong_token_is_explained_in_words(front: Front, watched: Watched) -> None:
    page = watched.open(front.base_url, "not-the-token")
    send(page, "hello")
    expect(page.locator(".turn .error")).to_have_text(re.compile(r"refused the token \(401 Unauthorized\)"))
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    assert "not-the-token" not in page.locator("body").inner_text()
    watched.shot(f"wrong-token-{front.name}")


def test_model_html_and_script_links_are_shown_as_text(server: ServerProcess, watched: Watched) -> None:
    page = watched.open(server.base_url, SERVER_TOKEN)
    hostile = ("<img src=x onerror=\"alert('img')\"> [click me](javascript:alert('link')) "
               "<script>alert('script')</script> <b>bold</b> see https://example.org/safe")
    send(page, hostile)
    wait_turn_done(page, 0)
    answer = page.locator(".turn .text")
    expect(answer).to_contain_text(hostile)
    assert page.locator("img").count() == 0
    assert page.locator(".turn script, .turn b").count() == 0
    assert page.locator("script").count() == 1, "only the page's own script"
    links = answer.locator("a")
    hrefs = [links.nth(n).get_attribute("href") for n in range(links.count())]
    assert hrefs == ["https://example.org/safe", "https://example.org/local-model"]
    for n in range(links.count()):
        assert links.nth(n).get_attribute("rel") == "noopener noreferrer"
    page.wait_for_timeout(300)
    assert watched.dialogs == []
    watched.shot("hostile-model-output")


def test_fits_a_phone_width(server: ServerProcess, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(f"{server.base_url}/")
        for label in ("Token", "Session", "Message"):
            expect(page.get_by_label(label)).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        expect(page.locator("#log")).to_have_attribute("aria-live", "polite")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / "phone.png", full_page=True)
    finally:
        context.close()


def test_sandbox_lost_is_explained_in_words(gateways: Gateways, gateway_url: str, watched: Watched) -> None:
    page = watched.open(gateway_url, ALICE)
    send(page, "[[delay:60]] this sandbox will die")
    expect(page.get_by_role("button", name="Interrupt")).to_be_enabled(timeout=TURN_TIMEOUT_MS)
    session_id = page.get_by_label("Session").input_value()
    gateway = gateways.started[0]
    route = gateway.route(session_id)
    assert route is not None
    gateways.kill_sandbox(route["sandbox_id"], route["pid"])
    expect(page.locator(".turn .error")).to_have_text(re.compile("sandbox stopped during this turn"), timeout=30_000)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    watched.shot("sandbox-lost")


# -- a connection dropped mid-turn ----------------------------------------------------------


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that passes everything through, except that it cuts the first
    turn stream (``POST .../messages``) right after its first ``text`` event, the way a
    flaky network would. It records what the browser sent, to check how it re-attached."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.cuts = 0
        self.sent_upstream = bytearray()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _connection(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        upstream_in, upstream_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        cut_this = asyncio.Event()

        async def to_upstream() -> None:
            while data := await client_in.read(65536):
                self.sent_upstream += data
                if self.cuts == 0 and re.search(rb"^POST /sessions/[^ ]+/messages ", data, re.MULTILINE):
                    cut_this.set()
                upstream_out.write(data)
                await upstream_out.drain()

        async def to_client() -> None:
            while data := await upstream_in.read(65536):
                if cut_this.is_set() and b"event: text" in data:
                    self.cuts += 1
                    client_out.write(data)
                    await client_out.drain()
                    client_out.transport.abort()
                    return
                client_out.write(data)
                await client_out.drain()

        try:
            await asyncio.wait([asyncio.ensure_future(to_upstream()), asyncio.ensure_future(to_client())],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            upstream_out.close()
            client_out.close()


def test_dropped_connection_reattaches_and_shows_the_answer_once(front: Front, watched: Watched) -> None:
    port = int(front.base_url.rsplit(":", 1)[1])
    with CuttingProxy(port) as proxy:
        page = watched.open(proxy.base_url, front.token)
        send(page, "[[slow:0.15]] Tell me about resumable streams")
        wait_turn_done(page, 0)
        assert proxy.cuts == 1, "the proxy cut the turn's stream"
        turn = page.locator(".turn")
        expect(turn).to_have_count(1)
        answer = turn.locator(".text")
        expect(answer).to_have_count(1)
        text = answer.inner_text()
        assert text.startswith("Local model answer to: Tell me about resumable streams"), text
        assert text.count("Local model answer to:") == 1 and text.count("This reply comes from") == 1, text
        assert text.rstrip().endswith("Local model documentation"), text
        expect(turn.locator(".result")).to_have_count(1)
        expect(turn.locator(".note")).to_have_count(0)
        session_id = page.get_by_label("Session").input_value()
        reattached = re.search(rf"GET /sessions/{session_id}/events HTTP/1.1\r\n(.*?)\r\n\r\n".encode(),
                               bytes(proxy.sent_upstream), re.DOTALL)
        assert reattached is not None, "the page re-attached with GET .../events"
        assert re.search(rb"(?im)^last-event-id: \S+", reattached.group(1)), "from the last event it had seen"
        watched.shot(f"reattached-{front.name}")


def test_the_api_page_renders_from_its_own_origin(server: ServerProcess, watched: Watched) -> None:
    """``AGENT_API_DOCS=1``: Swagger UI renders the server's schema under the page's policy,
    and the browser asks nothing of any other origin."""
    requested: list[str] = []
    violations: list[str] = []
    watched.page.on("request", lambda request: requested.append(request.url))
    watched.page.on("console", lambda message: violations.append(message.text)
                    if "Content Security Policy" in message.text else None)
    watched.page.goto(f"{server.base_url}/docs")
    expect(watched.page.locator(".swagger-ui .info .title")).to_contain_text("Research agent server")
    expect(watched.page.locator(".opblock-summary-path", has_text="/sessions/{session_id}/messages")).to_have_count(1)
    assert requested and all(url.startswith(f"{server.base_url}/") for url in requested), requested
    assert f"{server.base_url}/openapi.json" in requested and violations == []


def test_the_gateway_serves_no_api_page_from_another_origin(gateway_url: str) -> None:
    for path in ("/docs", "/redoc"):
        assert httpx.get(f"{gateway_url}{path}").status_code == 404, path
