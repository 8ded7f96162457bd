"""The terminal chat app, driven through a real pseudo-terminal: type keys, read the screen."""

from __future__ import annotations

import os
import re
import signal
import sys

import pexpect
import pytest

from qwenlm.demos.cli_chat import ChatApp, parse_conf_assignments

PROMPT = "User> "


@pytest.fixture
def app(tiny_checkpoint, tmp_path):
    """`qwenlm chat` on the tiny checkpoint in a pty, greedy so replies are deterministic."""
    env = {**os.environ, "QWENLM_CACHE": str(tmp_path), "COLUMNS": "80", "PYTHONUNBUFFERED": "1"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "qwenlm",
            "chat",
            "--model",
            str(tiny_checkpoint),
            "--max-new-tokens",
            "8",
            "--greedy",
            "--cpu-only",
        ],  # fmt: skip
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 80),
    )
    child.expect("Welcome to qwenlm chat")
    child.expect_exact(PROMPT)
    yield child
    child.close(force=True)


def _send(child, line: str) -> str:
    """Type a line and return everything printed up to the next prompt, colour codes removed."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", child.before)


def test_reply_streams_and_history_command_shows_it(app):
    screen = _send(app, "你好")
    assert "Qwen: " in screen
    history = _send(app, ":his")
    assert "User[0]" in history and "你好" in history and "Qwen[0]" in history
    assert "=" * 80 in history


def test_colours_on_a_terminal(app):
    screen = _send(app, ":seed")
    assert "[INFO] Current seed: 1234" in screen
    app.sendline("hello")
    app.expect_exact(PROMPT)
    assert "\x1b[1;36mQwen: " in app.before  # coloured because stdout is a tty


def test_help_and_unknown_colon_text_is_sent_as_a_message(app):
    assert ":clear-history" in _send(app, ":h")
    assert "Qwen: " in _send(app, ":not-a-command")  # like the reference: sent as a normal query


def test_clear_history_and_clear_screen(app):
    _send(app, "first")
    _send(app, "second")
    assert "[INFO] All 2 history cleared" in _send(app, ":clh")
    assert "User[0]" not in _send(app, ":history")
    assert "Welcome" in _send(app, ":cl")


def test_seed_command_sets_and_rejects(app):
    assert "Random seed changed to 7" in _send(app, ":seed 7")
    assert "[INFO] Current seed: 7" in _send(app, ":seed")
    assert "must be an integer" in _send(app, ":seed seven")


def test_conf_really_changes_generation_and_reset_restores_it(app):
    before = _send(app, "Tell me something")
    shown = _send(app, ":conf")
    assert "max_new_tokens = 8" in shown
    assert "[INFO] set max_new_tokens=2" in _send(app, ":conf max_new_tokens=2")
    after = _send(app, "Tell me something")
    assert len(after.split("Qwen: ", 1)[1].strip()) < len(before.split("Qwen: ", 1)[1].strip())
    assert "top_p" in _send(app, ":conf top_p=3")  # invalid: refused with a warning, nothing changed
    restored = _send(app, ":reset-conf")
    assert "restored" in restored and "max_new_tokens = 8" in restored


def test_empty_input_is_ignored_and_multi_line_input_is_one_message(app):
    app.sendline("")
    app.expect_exact(PROMPT)
    assert "Qwen" not in app.before
    app.sendline("first line \\")
    app.expect_exact("... ")
    _send(app, "second line")
    app.sendline('"""')
    app.expect_exact("... ")
    app.sendline("a block")
    app.expect_exact("... ")
    _send(app, '"""')
    history = _send(app, ":his")
    assert "first line \r\nsecond line" in history or "first line \nsecond line" in history
    assert "User[1]: a block" in history


def test_ctrl_c_stops_a_reply_and_keeps_the_session(tiny_checkpoint, tmp_path):
    env = {**os.environ, "QWENLM_CACHE": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "qwenlm", "chat", "--model", str(tiny_checkpoint),
                                           "--max-new-tokens", "30000", "--greedy"],  # fmt: skip
                          env=env, encoding="utf-8", timeout=60)  # fmt: skip
    child.expect_exact(PROMPT)
    child.sendline("go on forever")
    child.expect_exact("Qwen: ")
    child.expect(r"\S")  # some reply text is streaming
    child.kill(signal.SIGINT)
    child.expect("Generation interrupted")
    child.expect_exact(PROMPT)
    child.sendline(":his")
    child.expect_exact(PROMPT)
    assert "User[0]" not in child.before  # the interrupted turn is not kept
    child.sendline("")  # Ctrl-C at the prompt does not kill the app either
    child.expect_exact(PROMPT)
    child.kill(signal.SIGINT)
    child.expect("Ctrl-D")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_exit_commands(app):
    app.sendline(":q")
    app.expect(pexpect.EOF)
    app.close()
    assert app.exitstatus == 0


def test_plain_text_when_not_a_terminal(tiny_model, qwen_tokenizer):
    import io

    lines = iter(["hello", ":his", ":exit"])
    out = io.StringIO()
    ChatApp(tiny_model, qwen_tokenizer, out=out, read_line=lambda prompt: next(lines)).run()
    assert "\x1b[" not in out.getvalue() and "User[0]: hello" in out.getvalue()


def test_parse_conf_assignments():
    assert parse_conf_assignments(["temperature=0.7", "stop_words_ids=[[1,2]]", "chat_format=raw"]) == {
        "temperature": 0.7, "stop_words_ids": [[1, 2]], "chat_format": "raw"}  # fmt: skip
    with pytest.raises(ValueError, match="key=value"):
        parse_conf_assignments(["temperature"])


@pytest.mark.parametrize(
    "command,verdict,shows",
    [(":help", False, "Commands:"), (":h", False, "Commands:"), (":exit", True, ""), (":quit", True, ""),
     (":q", True, ""), (":clear", False, "Welcome"), (":cl", False, "Welcome"),
     (":clear-history", False, "history cleared"), (":clear-his", False, "history cleared"),
     (":clh", False, "history cleared"), (":history", False, "===="), (":his", False, "===="),
     (":seed", False, "Current seed: 1234"), (":seed 5", False, "changed to 5"), (":conf", False, "top_p ="),
     (":conf temperature=0.5", False, "set temperature=0.5"), (":reset-conf", False, "restored"),
     (":nope", None, "")],
)  # fmt: skip
def test_every_command_alias_is_routed(tiny_model, qwen_tokenizer, command, verdict, shows):
    import io

    out = io.StringIO()
    app = ChatApp(tiny_model, qwen_tokenizer, out=out, read_line=lambda prompt: "")
    assert app.handle_command(command) is verdict
    assert shows in out.getvalue()
