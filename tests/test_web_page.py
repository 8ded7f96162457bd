"""The page's HTTP side (qwenlm.web.page) over the real API app and a scripted engine: what is served
where, with which headers, open or behind the API key; and that the page needs nothing from the internet."""

from __future__ import annotations

import re
import threading

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from qwenlm.server.app import create_app
from qwenlm.web import page as web_page
from qwenlm.web.page import CONTENT_SECURITY_POLICY, DEMO_NOTICE, STATIC_DIR, announce, index_html, page_url, with_page

KEY = "sk-page"


@pytest.fixture(scope="module")
def client():
    return TestClient(with_page(create_app(FakeEngine(reply="Hi"), api_key=KEY, served_model_name="m")))


def test_the_page_and_its_files_are_open_and_the_api_still_needs_the_key(client):
    home = client.get("/")
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert home.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert home.headers["x-content-type-options"] == "nosniff" and home.headers["cache-control"] == "no-cache"
    for name in ("app.js", "api.js", "store.js", "markdown.js"):
        script = client.get(f"/static/{name}")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"], name
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] == "m"
    assert client.get("/health").status_code == 200


def test_nothing_else_is_served_from_the_package(client):
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/static/%2e%2e/page.py").status_code == 404
    assert client.post("/").status_code == 405
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/index.html", headers=auth).json()["error"]["code"] == "not_found"  # the API's 404


def test_the_page_loads_only_its_own_files():
    html = index_html()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(ref.startswith("/static/") and (STATIC_DIR / ref[len("/static/") :]).is_file() for ref in refs)
    for script in STATIC_DIR.glob("*.js"):
        imports = re.findall(r'from "([^"]+)"', script.read_text())
        assert all(i.startswith("./") and (STATIC_DIR / i[2:]).is_file() for i in imports), script.name
    assert "url(" not in (STATIC_DIR / "style.css").read_text()  # no fonts or images fetched by the styles


def test_a_start_up_notice_is_escaped_into_the_page():
    html = index_html('<b onclick="x()">&</b>')
    assert '<meta name="qwenlm-notice" content="&lt;b onclick=&quot;x()&quot;&gt;&amp;&lt;/b&gt;">' in html
    demo = TestClient(with_page(create_app(FakeEngine(reply="Hi")), demo=True)).get("/").text
    assert f'content="{DEMO_NOTICE}"' in demo


def test_page_url_reaches_a_wildcard_listener_over_loopback():
    assert page_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/"
    assert page_url("::", 80) == "http://127.0.0.1:80/"
    assert page_url("::1", 8000) == "http://[::1]:8000/"
    assert page_url("example.org", 7860) == "http://example.org:7860/"


def test_inbrowser_opens_the_page_once_the_server_is_up(monkeypatch, capsys):
    opened = []
    monkeypatch.setattr(web_page.webbrowser, "open", lambda url: opened.append(url) or True)

    class Server:
        started, should_exit = False, False

    server = Server()
    thread = announce(server, "0.0.0.0", 8123, open_browser=True)
    assert isinstance(thread, threading.Thread) and not opened
    server.started = True
    thread.join(timeout=5)
    assert opened == ["http://127.0.0.1:8123/"] and "chat page: http://127.0.0.1:8123/" in capsys.readouterr().err
