"""A lone server's safe defaults, in process: which settings may serve without a token, and the
API page (``AGENT_API_DOCS=1``) loading nothing from another origin (the refusals of real
processes: tests/integration/test_safe_defaults.py)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from hosting.server.app import create_app
from hosting.server.settings import Settings
from hosting.settings_env import ConfigError


@pytest.mark.parametrize(("env", "refused"), [
    ({}, True),  # the default HOST is 0.0.0.0
    ({"HOST": "::"}, True), ({"HOST": "192.0.2.1"}, True), ({"HOST": "agent.internal"}, True),
    ({"AGENT_ALLOW_UNAUTHENTICATED": "0"}, True), ({"AGENT_AUTH_TOKEN": " "}, True),
    ({"AGENT_ALLOW_UNAUTHENTICATED": "1"}, False), ({"AGENT_AUTH_TOKEN": "t"}, False),
    ({"HOST": "127.0.0.1"}, False), ({"HOST": "127.3.2.1"}, False), ({"HOST": "::1"}, False),
    ({"HOST": "localhost"}, False),
])
def test_which_settings_may_serve_without_a_token(env: dict[str, str], refused: bool) -> None:
    settings = Settings.from_env(env)
    if refused:
        with pytest.raises(ConfigError, match="AGENT_AUTH_TOKEN.*AGENT_ALLOW_UNAUTHENTICATED=1"):
            settings.require_auth_off_loopback()
    else:
        settings.require_auth_off_loopback()


def test_the_opt_out_must_be_a_yes_or_a_no() -> None:
    with pytest.raises(ConfigError, match="AGENT_ALLOW_UNAUTHENTICATED must be 1 or 0"):
        Settings.from_env({"AGENT_ALLOW_UNAUTHENTICATED": "please"})


class _References(HTMLParser):
    """Every URL an HTML page would load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "action", "data") and value]


async def test_with_api_docs_the_page_and_its_assets_are_same_origin(tmp_path: Path) -> None:
    app = create_app(Settings(host="127.0.0.1", data_dir=tmp_path, api_docs=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.1:8000") as client:
        page = await client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self';" in policy and "connect-src 'self'" in policy
        parser = _References()
        parser.feed(page.text)
        assert len(parser.urls) >= 3, page.text
        assert "<script>" not in page.text  # no inline script: the policy allows this origin's files only
        for url in parser.urls:
            assert url.startswith("/") and not url.startswith("//"), url  # no scheme, no other host
            asset = await client.get(url)
            assert asset.status_code == 200 and asset.content, url
            assert asset.headers["content-security-policy"] == policy
        start = (await client.get("/docs/start.js")).text
        assert '"/openapi.json"' in start and "validatorUrl: null" in start and "http" not in start
        assert "SwaggerUIBundle" in (await client.get("/docs/swagger-ui-bundle.js")).text
        assert (await client.get("/openapi.json")).json()["info"]["title"] == "Research agent server"
        assert (await client.get("/redoc")).status_code == 404  # no same-origin ReDoc: off
