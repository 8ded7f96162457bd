"""The chat page end to end: the real `qwenlm web` process on a tiny real checkpoint, driven by headless
Chromium (Debian's `chromium`, launched by Playwright with `executable_path`; never `playwright install`).

Replies come from the real model, except where a test needs exact model output (the renderer and its
escaping): there Playwright fulfils `/v1/chat/completions` with a crafted SSE body. Screenshots go to
tests/artifacts/web/; QWENLM_WEB_README_SCREENSHOT=1 also rewrites docs/web-chat.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from server_process import running_server

API_KEY = "sk-web-test"
MODEL = "qwen-tiny"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts" / "web"
README_SCREENSHOT = ROOT / "docs" / "web-chat.png"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-background-networking",  # no calls home on a closed network
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHAT_URL = "**/v1/chat/completions"


def chromium_path() -> str | None:
    return (
        os.environ.get("QWENLM_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("chromium-headless-shell")
    )


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def metric(base: str, name: str) -> float:
    """One unlabelled sample of the server's /metrics (open without the API key)."""
    text = _get(f"{base}/metrics")[1]
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# --------------------------------------------------------------------------------------------------
# Fixtures: one server and one browser for the module, a fresh browser context (storage) per test


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("web") / "server.log"
    args = ("--api-key", API_KEY, "--served-model-name", MODEL, "--max-num-seqs", "4", "--max-model-len", "1024",
            "--cpu-only")  # fmt: skip
    with running_server(tiny_checkpoint, log_path, *args, command="web") as (base, _):
        yield base


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium: apt-get install chromium (Debian), or set QWENLM_CHROMIUM to a Chromium binary")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def init_storage(api_key: str | None, max_tokens: int) -> str:
    """A script run before the page's own: the API key and settings a returning user would have."""
    items = {"qwenlm.settings": json.dumps({"max_tokens": str(max_tokens)})}
    if api_key:
        items["qwenlm.apiKey"] = api_key
    sets = "".join(f"if (localStorage.getItem({json.dumps(k)}) === null) localStorage.setItem({json.dumps(k)}, "
                   f"{json.dumps(v)});" for k, v in items.items())  # fmt: skip
    return f"if (location.protocol === 'http:') {{ {sets} }}"  # not in about:blank (no storage there)


@pytest.fixture
def new_context(browser, server, request):
    """Make a browser context on the server; JS errors on its pages fail the test; screenshots at the end."""
    contexts, errors = [], []

    def make(api_key: str | None = API_KEY, max_tokens: int = 16, **options):
        options.setdefault("viewport", {"width": 1180, "height": 760})
        context = browser.new_context(base_url=server, **options)
        context.add_init_script(script=init_storage(api_key, max_tokens))
        context.on("page", lambda page: page.on("pageerror", lambda err: errors.append(str(err))))
        contexts.append(context)
        return context

    yield make
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for i, context in enumerate(contexts):
        for j, page in enumerate(context.pages):
            page.screenshot(path=ARTIFACTS / f"{request.node.name}-{i}{j}.png")
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(new_context) -> Page:
    page = new_context().new_page()
    page.goto("/")
    expect(page.locator("#model-name")).to_have_text(MODEL)
    return page


def settings(page: Page, **values: object) -> None:
    """Fill fields of the Settings panel (opened if closed): settings(page, max_tokens=48, top_p=0.9)."""
    if page.locator("#settings[open]").count() == 0:
        page.click("#settings summary")
    for name, value in values.items():
        page.fill("#" + name.replace("_", "-"), str(value))


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_for_reply(page: Page, timeout: float = 30_000) -> None:
    """Until the reply streaming now has ended (Send is back, the reply's meta line is written)."""
    expect(page.locator("#send")).to_be_visible(timeout=timeout)
    expect(page.locator(".message.assistant").last.locator(".meta")).not_to_be_empty(timeout=timeout)


def record_growth(page: Page) -> None:
    """From now on, window.growth lists [epoch ms, length] each time the last reply's text changes length."""
    page.evaluate("""() => {
        window.growth = [];
        new MutationObserver(() => {
            const content = document.querySelector('.message.assistant:last-child .content');
            const length = content ? content.textContent.length : 0;
            if (length && length !== window.growth.at(-1)?.[1]) window.growth.push([Date.now(), length]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def stored_conversation(page: Page) -> dict:
    """The conversation open in the page, as kept in localStorage."""
    return page.evaluate("JSON.parse(localStorage.getItem('qwenlm.chat.' + location.hash.slice(1)))")


def chat_bodies(page: Page) -> list[dict]:
    """Collects the JSON bodies the page posts to /v1/chat/completions."""
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def sse_body(*pieces: str, finish: str = "stop") -> str:
    """A chat.completion.chunk stream, as the server sends it."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------------
# The real model


def test_reply_streams_token_by_token_and_the_conversation_survives_a_reload(page: Page):
    settings(page, max_tokens=96)
    record_growth(page)
    send(page, "Hello")
    expect(page.locator(".message.user .content")).to_have_text("Hello")
    wait_for_reply(page)
    lengths = [n for _, n in page.evaluate("window.growth")]
    partial = {n for n in lengths if 0 < n < max(lengths)}
    assert len(partial) >= 2, f"the reply did not grow in steps: {lengths}"
    reply = page.locator(".message.assistant .content").inner_text()
    stored = stored_conversation(page)
    assert [(m["role"], m["content"]) for m in stored["messages"]][0] == ("user", "Hello")
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert re.search(r"\d+ tokens", page.locator(".message.assistant .meta").inner_text())

    page.fill("#prompt", "line one")  # Shift+Enter is a new line, not a send
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "line one\nline two"
    expect(page.locator(".message")).to_have_count(2)
    page.fill("#prompt", "")

    page.reload()
    expect(page.locator("#conversation-list .open")).to_have_text(["Hello"])
    expect(page.locator(".message.assistant")).to_have_count(1)
    assert page.locator(".message.assistant .content").inner_text() == reply

    page.locator("#conversation-list .rename").click()
    page.fill(".rename-input", "Greetings")
    page.press(".rename-input", "Enter")
    expect(page.locator("#chat-title")).to_have_text("Greetings")
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["title"] == "Greetings" and exported["model"] == MODEL
    assert exported["messages"] == [{"role": "system", "content": "You are a helpful assistant."}] + [
        {"role": m["role"], "content": m["content"]} for m in stored["messages"]
    ]

    page.click("#new-chat")
    expect(page.locator("#conversation-list .open")).to_have_text(["New chat", "Greetings"])
    page.locator(".conversation", has_text="Greetings").locator(".delete").click()
    page.locator(".conversation", has_text="Greetings").locator(".delete").click()  # the second click confirms
    expect(page.locator("#conversation-list .open")).to_have_text(["New chat"])
    page.reload()
    expect(page.locator(".message")).to_have_count(0)

    page.set_input_files("#import-file", download.value.path())  # the exported file comes back as it was
    expect(page.locator("#conversation-list .open")).to_have_text(["Greetings"])
    assert [(m["role"], m["content"]) for m in stored_conversation(page)["messages"]] == [
        (m["role"], m["content"]) for m in stored["messages"]
    ]


def test_stop_ends_the_reply_and_frees_the_server_slot(page: Page, server: str):
    settings(page, max_tokens=900)
    send(page, "Tell me a long story")
    content = page.locator(".message.assistant .content")
    expect(content).not_to_be_empty(timeout=30_000)
    assert metric(server, "qwenlm_requests_running") == 1
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".message.assistant .meta")).to_contain_text("stopped")
    text = content.inner_text()
    deadline = time.time() + 15
    while metric(server, "qwenlm_requests_running") != 0:  # the closed connection aborted the engine request
        assert time.time() < deadline, "the server kept generating after the page stopped"
        time.sleep(0.1)
    generated = metric(server, "qwenlm_generation_tokens_total")
    time.sleep(0.5)
    assert metric(server, "qwenlm_generation_tokens_total") == generated
    assert content.inner_text() == text and 0 < len(stored_conversation(page)["messages"][1]["content"])


def test_system_prompt_settings_regenerate_and_edit_reach_the_request(page: Page):
    bodies = chat_bodies(page)
    page.click("#system-panel summary")
    page.fill("#system-prompt", "You are a pirate.")
    settings(page, temperature=0.7, top_p=0.9, max_tokens=8)
    send(page, "Ahoy")
    wait_for_reply(page)
    pirate = {"role": "system", "content": "You are a pirate."}
    assert bodies[-1] == {
        "model": MODEL,
        "messages": [pirate, {"role": "user", "content": "Ahoy"}],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    page.click(".message.assistant [data-action=regenerate]")
    wait_for_reply(page)
    assert len(bodies) == 2 and bodies[1]["messages"] == bodies[0]["messages"]
    expect(page.locator(".message")).to_have_count(2)

    page.click(".message.user [data-action=edit]")
    page.fill(".edit-box", "Ahoy, matey")
    page.click("[data-action=save-edit]")
    wait_for_reply(page)
    assert bodies[2]["messages"] == [pirate, {"role": "user", "content": "Ahoy, matey"}]
    expect(page.locator(".message.user .content")).to_have_text("Ahoy, matey")
    expect(page.locator(".message")).to_have_count(2)

    send(page, "And then?")  # history goes back as the raw text the model wrote, not the rendered HTML
    wait_for_reply(page)
    first_reply = stored_conversation(page)["messages"][1]["content"]
    assert bodies[3]["messages"][1:] == [
        {"role": "user", "content": "Ahoy, matey"},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "And then?"},
    ]
    page.reload()
    page.click("#system-panel summary")
    expect(page.locator("#system-prompt")).to_have_value("You are a pirate.")
    expect(page.locator("#temperature")).to_have_value("0.7")
    page.click("#clear")
    expect(page.locator(".message")).to_have_count(4)
    page.click("#clear")  # the second click confirms
    expect(page.locator(".message")).to_have_count(0)
    page.reload()
    expect(page.locator(".message")).to_have_count(0)
    page.click("#system-panel summary")
    expect(page.locator("#system-prompt")).to_have_value("You are a pirate.")  # clearing keeps the system prompt


def test_errors_are_shown_and_the_page_recovers(page: Page):
    settings(page, max_tokens=100000)
    send(page, "Hi")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("maximum context length")
    expect(page.locator(".message")).to_have_count(1)  # no empty reply left behind; the question stays

    settings(page, max_tokens=8)
    page.click(".message.user [data-action=regenerate]")  # "Retry"
    wait_for_reply(page)
    expect(error).to_be_hidden()

    page.route(CHAT_URL, lambda route: route.abort("connectionrefused"))  # the server is gone
    send(page, "Still there?")
    expect(error).to_contain_text("Cannot reach the server")
    page.unroute(CHAT_URL)

    cut = sse_body("Half a rep")[: -len("data: [DONE]\n\n")].rsplit("data:", 1)[0]  # no finish, no [DONE]
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=cut))
    page.click(".message.user >> nth=-1 >> [data-action=regenerate]")
    expect(error).to_contain_text("lost in the middle of the reply")
    expect(page.locator(".message.assistant").last.locator(".content")).to_have_text("Half a rep")
    expect(page.locator(".message.assistant").last.locator(".meta")).to_contain_text("interrupted")


def test_a_message_that_got_no_reply_is_replaced_by_the_next(page: Page):
    """A refused or failed message stays on screen with Retry; sending anew replaces it instead of leaving two user
    turns in a row (which the server refuses, so the chat would be stuck)."""
    settings(page, max_tokens=100000)
    send(page, "Too long a reply asked for")
    expect(page.locator("#error")).to_contain_text("maximum context length")
    settings(page, max_tokens=8)
    send(page, "Hi again")
    wait_for_reply(page)
    expect(page.locator("#error")).to_be_hidden()
    assert [m["role"] for m in stored_conversation(page)["messages"]] == ["user", "assistant"]
    assert stored_conversation(page)["messages"][0]["content"] == "Hi again"
    expect(page.locator("#status")).to_have_text("Reply finished.")


def test_keyboard_and_narrow_screens(new_context):
    """Esc stops a reply wherever focus is (Send hands focus to Stop); on a phone the sidebar closes with Esc or a
    tap beside it, and while closed its controls are out of the Tab order."""
    page = new_context(viewport={"width": 375, "height": 700}).new_page()
    page.goto("/")
    expect(page.locator("#model-name")).to_have_text(MODEL)
    toggle, sidebar = page.locator("#sidebar-toggle"), page.locator("#sidebar")
    assert sidebar.evaluate("s => s.inert")
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    page.keyboard.press("Escape")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    assert sidebar.evaluate("s => s.inert")
    toggle.click()
    page.mouse.click(360, 400)  # beside the sidebar (it is at most 300px wide)
    expect(toggle).to_have_attribute("aria-expanded", "false")

    toggle.click()  # Settings live in the sidebar
    settings(page, max_tokens=900)
    page.keyboard.press("Escape")
    page.fill("#prompt", "Tell me a long story")
    page.click("#send")
    expect(page.locator("#stop")).to_be_focused()
    expect(page.locator(".message.assistant .content")).not_to_be_empty(timeout=30_000)
    page.keyboard.press("Escape")
    expect(page.locator(".message.assistant .meta")).to_contain_text("stopped")
    expect(page.locator("#prompt")).to_be_focused()


def test_a_missing_api_key_is_asked_for(new_context):
    page = new_context(api_key=None).new_page()
    page.goto("/")
    expect(page.locator("#error")).to_contain_text("needs an API key")
    expect(page.locator("#api-key")).to_be_focused()
    send(page, "Sent before the key")  # shown and kept (with Retry), not swallowed
    expect(page.locator(".message.user .content")).to_have_text("Sent before the key")
    page.fill("#api-key", "sk-wrong")
    page.press("#api-key", "Enter")
    expect(page.locator("#error")).to_contain_text("Incorrect API key")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#model-name")).to_have_text(MODEL)
    expect(page.locator("#error")).to_be_hidden()
    send(page, "Hi")
    wait_for_reply(page)
    page.reload()  # the key is remembered
    expect(page.locator("#model-name")).to_have_text(MODEL)


def test_two_tabs_stream_at_the_same_time(new_context):
    context = new_context(max_tokens=128)
    tabs = [context.new_page(), context.new_page()]
    for tab in tabs:
        tab.goto("/")
        expect(tab.locator("#model-name")).to_have_text(MODEL)
        record_growth(tab)
    for i, tab in enumerate(tabs):
        tab.fill("#prompt", f"Question from tab {i}")
    for tab in tabs:
        tab.press("#prompt", "Enter")
    for tab in tabs:
        wait_for_reply(tab)
        expect(tab.locator("#conversation-list .open")).to_have_count(2)  # each tab lists both conversations
    (first0, last0), (first1, last1) = [(g[0][0], g[-1][0]) for g in (tab.evaluate("window.growth") for tab in tabs)]
    assert first1 < last0 and first0 < last1, "one tab's reply streamed only after the other's had ended"
    assert {t.locator(".message.user .content").inner_text() for t in tabs} == {"Question from tab 0",
                                                                                 "Question from tab 1"}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Rendering (exact model output, so the reply comes from a crafted event stream)

README_QUESTION = "Write a Python function that tells whether a number is prime, and explain it briefly."
README_REPLY = """Here is a small, fast version using **trial division**:

```python
def is_prime(n: int) -> bool:
    \"\"\"True if n is a prime number.\"\"\"
    if n < 2:
        return False
    for d in range(2, int(n ** 0.5) + 1):
        if n % d == 0:  # found a divisor
            return False
    return True
```

How it works:

1. Numbers below `2` are not prime.
2. A divisor larger than `√n` pairs with one smaller than it, so checking up to `√n` is enough.
3. The loop stops at the first divisor.

| n | is_prime(n) |
|---|:---:|
| 7 | True |
| 9 | False |
"""


def test_markdown_reply_renders_with_highlighted_code_and_copy(new_context):
    context = new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    earlier = [("Translate 'good morning' into Chinese", "早上好 (zǎoshang hǎo)"), ("Summarise Hamlet", "…")]
    for i, (question, answer) in enumerate(earlier):  # a sidebar like a user's
        conversation = {"id": f"earlier{i}", "title": "", "system": "You are a helpful assistant.", "created": i,
                        "updated": i, "messages": [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": answer}]}  # fmt: skip
        page.add_init_script(f"localStorage.setItem('qwenlm.chat.earlier{i}', {json.dumps(json.dumps(conversation))})")
    pieces = re.findall(r".{1,12}", README_REPLY, re.DOTALL)
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                     body=sse_body(*pieces)))  # fmt: skip
    page.goto("/")
    page.click("#new-chat")
    send(page, README_QUESTION)
    reply = page.locator(".message.assistant .content")
    expect(reply.locator(".code-block")).to_have_count(1)
    expect(reply.locator(".code-lang")).to_have_text("python")
    expect(reply.locator(".tok-keyword", has_text="def")).to_have_count(1)
    expect(reply.locator(".tok-comment")).to_have_text("# found a divisor")
    expect(reply.locator(".tok-string")).to_have_text('"""True if n is a prime number."""')
    expect(reply.locator("ol > li")).to_have_count(3)
    expect(reply.locator("table td")).to_have_text(["7", "True", "9", "False"])
    expect(reply.locator("strong")).to_have_text("trial division")
    if os.environ.get("QWENLM_WEB_README_SCREENSHOT"):
        page.set_viewport_size({"width": 1180, "height": 900})
        page.locator("#messages").evaluate("box => box.scrollTop = 0")
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=README_SCREENSHOT)
    code = README_REPLY.split("```python\n")[1].split("```")[0].rstrip("\n")
    assert reply.locator("pre code").inner_text() == code
    reply.locator(".copy-code").click()
    expect(reply.locator(".copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == code
    assert stored_conversation(page)["messages"][1]["content"] == README_REPLY  # raw text kept, not HTML


HOSTILE_REPLY = """<script>window.pwned = 'script'</script>
<img src=x onerror="window.pwned = 'img'"> <b>bold?</b> &amp; &lt;
[click me](javascript:window.pwned='link') [ok](https://example.com/?a=1&b="2")
<svg onload="window.pwned = 'svg'"></svg> `<img src=y onerror="window.pwned = 'code'">`
```html
<img src=z onerror="window.pwned = 'block'">
```
"""


def test_html_in_a_reply_is_shown_as_text_and_never_runs(new_context):
    page = new_context(bypass_csp=True).new_page()  # without the page's CSP: the escaping alone must hold
    body = sse_body(*re.findall(r".{1,7}", HOSTILE_REPLY, re.S))
    page.route(CHAT_URL, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.goto("/")
    send(page, "Say something dangerous")
    reply = page.locator(".message.assistant .content")
    expect(reply).to_contain_text("<script>window.pwned = 'script'</script>")
    expect(reply).to_contain_text("""<img src=x onerror="window.pwned = 'img'"> <b>bold?</b> &amp; &lt;""")
    page.wait_for_timeout(300)  # an image error handler would have fired by now
    assert page.evaluate("window.pwned") is None
    assert reply.locator("script, img, svg, b, iframe").count() == 0
    hrefs = reply.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert hrefs == ['https://example.com/?a=1&b="2"']
    expect(reply.locator("pre code")).to_have_text("""<img src=z onerror="window.pwned = 'block'">""")


CODE_HEAD = (
    '<div class="code-block"><div class="code-head"><span class="code-lang">{}</span><button type="button" '
    'class="copy-code" aria-label="Copy code">Copy</button></div><pre><code>'
)
RENDER_CASES = {  # markdown -> the exact HTML
    "a < b && c > d": "<p>a &lt; b &amp;&amp; c &gt; d</p>",
    "**bold** and *it* and `x<y`": "<p><strong>bold</strong> and <em>it</em> and <code>x&lt;y</code></p>",
    "`**not bold**`": "<p><code>**not bold**</code></p>",
    "snake_case_name": "<p>snake_case_name</p>",
    "line one\nline two": "<p>line one<br>line two</p>",
    "# Title\n\ntext": "<h1>Title</h1><p>text</p>",
    "Title\n===\nSub <i>\n---\n\n---": "<h1>Title</h1><h2>Sub &lt;i&gt;</h2><hr>",  # underlined headings, a rule
    "- a\n- b\n  - c": "<ul><li>a</li><li>b<ul><li>c</li></ul></li></ul>",
    "3. three\n4. four": '<ol start="3"><li>three</li><li>four</li></ol>',
    "> quoted <i>": "<blockquote><p>quoted &lt;i&gt;</p></blockquote>",
    "[a](https://x.org/?q=1&r=2)": '<p><a href="https://x.org/?q=1&amp;r=2" target="_blank" '
    'rel="noopener noreferrer">a</a></p>',
    "[a](javascript:alert(1))": "<p>[a](javascript:alert(1))</p>",
    '[a](https://x.org/"onmouseover="alert(1))': '<p><a href="https://x.org/&quot;onmouseover=&quot;alert(1" '
    'target="_blank" rel="noopener noreferrer">a</a>)</p>',
    "see https://x.org.": '<p>see <a href="https://x.org" target="_blank" rel="noopener noreferrer">https://x.org</a>.</p>',
    "nul\u0000byte": "<p>nul\ufffdbyte</p>",
    "```py\nprint(1": f'{CODE_HEAD.format("py")}<span class="tok-call">print</span>(<span class="tok-number">1</span>'
    "</code></pre></div>",  # a block still streaming
    "```constructor\nx < y\n```": f"{CODE_HEAD.format('constructor')}x &lt; y</code></pre></div>",
}


def test_markdown_renderer_escapes_everything(page: Page):
    render = "([cases]) => import('/static/markdown.js').then(m => cases.map(c => m.renderMarkdown(c)))"
    assert dict(zip(RENDER_CASES, page.evaluate(render, [list(RENDER_CASES)]), strict=True)) == RENDER_CASES
    assert page.evaluate("import('/static/markdown.js').then(m => m.highlight('x = \"<b>\"  # <i>', 'python'))") == (
        'x = <span class="tok-string">&quot;&lt;b&gt;&quot;</span>  <span class="tok-comment"># &lt;i&gt;</span>'
    )
    # Random text over markdown's and HTML's special characters: whatever comes out holds only the
    # renderer's own tags and attributes, and links only to http(s).
    problems = page.evaluate("""async () => {
        const m = await import('/static/markdown.js');
        const alphabet = ['<', '>', '&', '"', "'", '`', '```', '*', '_', '~~', '[', ']', '(', ')', '|', '#', '-',
            '1.', '>', '\\n', '\\n\\n', ' ', 'a', 'script', 'img', 'onerror=', 'javascript:', 'https://', 'x.y', '\\\\',
            '&lt;', '\\u0000', '    ', 'python', ':---'];
        const tags = new Set(['P', 'BR', 'STRONG', 'EM', 'DEL', 'CODE', 'PRE', 'SPAN', 'A', 'UL', 'OL', 'LI', 'H1',
            'H2', 'H3', 'H4', 'H5', 'H6', 'BLOCKQUOTE', 'HR', 'DIV', 'BUTTON', 'TABLE', 'THEAD', 'TBODY', 'TR',
            'TH', 'TD']);
        const attributes = new Set(['class', 'href', 'target', 'rel', 'start', 'type', 'aria-label']);
        let seed = 7;
        const random = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
        const problems = [];
        for (let i = 0; i < 400; i++) {
            let text = '';
            for (let j = random(40); j >= 0; j--) text += alphabet[random(alphabet.length)];
            const box = document.createElement('template');
            box.innerHTML = m.renderMarkdown(text);
            for (const node of box.content.querySelectorAll('*')) {
                if (!tags.has(node.tagName)) problems.push([text, node.tagName]);
                for (const a of node.attributes) if (!attributes.has(a.name)) problems.push([text, a.name]);
                const href = node.getAttribute('href');
                if (href !== null && !/^https?:\\/\\//.test(href)) problems.push([text, 'href']);
            }
        }
        return problems;
    }""")
    assert problems == []
