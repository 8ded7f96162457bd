"""The terminal chat app behind `qwenlm chat`: a streaming REPL over `qwenlm.chat.chat_stream`.

It keeps the reference `cli_demo.py` commands (:help, :exit, :clear, :clear-history, :history, :seed,
:conf, :reset-conf) and fixes what was awkward there: `:conf` really changes generation, Ctrl-C stops
only the current reply, input can span several lines, and colours appear only on a terminal.

    ChatApp(model, tokenizer, seed=1234).run()
"""

from __future__ import annotations

import ast
import dataclasses
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any, TextIO

from ..chat import chat_stream
from ..chat_format import DEFAULT_SYSTEM
from ..generation.params import SamplingParams
from ..model.config import GenerationConfig

HELP = """Commands:
  :help / :h                 show this help
  :exit / :quit / :q         leave (Ctrl-D works too)
  :clear / :cl               clear the screen
  :clear-history / :clh      forget the conversation so far
  :history / :his            show the conversation so far
  :seed [N]                  show or set the sampling seed (each reply is re-seeded with it)
  :conf [key=value ...]      show or change generation settings, e.g. :conf temperature=0.7 top_p=0.9
  :reset-conf                restore the settings the model came with
Ctrl-C stops the current reply. End a line with \\ to continue on the next one, or wrap a block
in \"\"\" lines. Anything else starting with ':' is sent as a normal message."""

WELCOME = "Welcome to qwenlm chat: type a message, :h for help, :q or Ctrl-D to leave."


class Style:
    """ANSI colours on a terminal (unless NO_COLOR is set); plain text everywhere else."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text

    def user(self, text: str) -> str:
        return self._wrap("1;32", text)

    def bot(self, text: str) -> str:
        return self._wrap("1;36", text)

    def info(self, text: str) -> str:
        return self._wrap("2", text)

    def warn(self, text: str) -> str:
        return self._wrap("33", text)


def parse_conf_assignments(words: list[str]) -> dict[str, Any]:
    """`key=value` words into a dict; values are Python literals (0.7, None, [[151643]]) or bare strings."""
    updates: dict[str, Any] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {word!r}")
        try:
            updates[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            updates[key] = raw
    return updates


class ChatApp:
    """The REPL. Input and output are injectable so the logic is testable without a terminal."""

    def __init__(
        self, model, tokenizer, *, seed: int = 1234, system: str = DEFAULT_SYSTEM,
        generation_config: GenerationConfig | None = None, out: TextIO | None = None,
        read_line: Callable[[str], str] = input, color: bool | None = None,
    ) -> None:  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.seed, self.system = seed, system
        self.original_config = generation_config or model.generation_config or GenerationConfig()
        self.config = self.original_config
        self.history: list[tuple[str, str]] = []
        self.out = out or sys.stdout
        self.read_line = read_line
        if color is None:
            color = hasattr(self.out, "isatty") and self.out.isatty() and not os.environ.get("NO_COLOR")
        self.style = Style(color)

    # ---- output helpers ----------------------------------------------------------------------
    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    # ---- input -------------------------------------------------------------------------------
    def read_message(self) -> str:
        """One message: a line, lines joined by trailing backslashes, or a \"\"\" block."""
        first = self.read_line(self.style.user("User> "))
        if first.strip() == '"""':
            lines = []
            while (line := self.read_line("... ")).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self.read_line("... "))
        return "\n".join(lines)

    # ---- commands ----------------------------------------------------------------------------
    def handle_command(self, text: str) -> bool | None:
        """Run a `:command`. True: leave the app; False: handled; None: not a command (send it)."""
        words = text[1:].split()
        name, args = (words[0] if words else ""), words[1:]
        if name in ("help", "h"):
            self.say(HELP)
        elif name in ("exit", "quit", "q"):
            return True
        elif name in ("clear", "cl"):
            self.say("\033[2J\033[H" if self.style.enabled else "", end="")
            self.say(WELCOME)
        elif name in ("clear-history", "clear-his", "clh"):
            self.say(self.style.info(f"[INFO] All {len(self.history)} history cleared"))
            self.history = []
        elif name in ("history", "his"):
            self.show_history()
        elif name == "seed":
            self.set_seed(args)
        elif name == "conf":
            self.change_conf(args)
        elif name == "reset-conf":
            self.config = self.original_config
            self.say(self.style.info("[INFO] generation settings restored"))
            self.show_conf()
        else:
            return None
        return False

    def show_history(self) -> None:
        width = shutil.get_terminal_size((80, 20)).columns
        self.say("=" * width)
        for i, (query, response) in enumerate(self.history):
            self.say(f"{self.style.user(f'User[{i}]')}: {query}")
            self.say(f"{self.style.bot(f'Qwen[{i}]')}: {response}")
        self.say("=" * width)

    def set_seed(self, args: list[str]) -> None:
        if not args:
            self.say(f"[INFO] Current seed: {self.seed}")
            return
        try:
            self.seed = int(args[0])
        except ValueError:
            self.say(self.style.warn(f"[WARNING] seed must be an integer, got {args[0]!r}"))
            return
        self.say(f"[INFO] Random seed changed to {self.seed}")

    def show_conf(self) -> None:
        shown = {k: v for k, v in self.config.to_dict().items() if k != "seed"}
        self.say("\n".join(f"  {k} = {v!r}" for k, v in shown.items()))

    def change_conf(self, args: list[str]) -> None:
        if not args:
            self.show_conf()
            return
        try:
            updated = self.config.updated(**parse_conf_assignments(args))
            SamplingParams.from_generation_config(updated)  # validate now, not at the next reply
        except (ValueError, TypeError) as err:
            self.say(self.style.warn(f"[WARNING] {err}"))
            return
        self.config = updated
        changed = ", ".join(f"{k}={getattr(updated, k)!r}" for k in parse_conf_assignments(args))
        self.say(self.style.info(f"[INFO] set {changed}"))

    # ---- a chat turn -------------------------------------------------------------------------
    def reply(self, query: str) -> None:
        """Stream one reply; Ctrl-C stops it and the unfinished turn is left out of the history."""
        self.say(self.style.bot("Qwen: "), end="")
        config = dataclasses.replace(self.config, seed=self.seed)  # same seed + context = same reply
        response = ""
        try:
            for delta in chat_stream(self.model, self.tokenizer, query, self.history, self.system,
                                     generation_config=config, delta=True):  # fmt: skip
                response += delta
                self.say(delta, end="")
        except KeyboardInterrupt:
            self.say("\n" + self.style.warn("[WARNING] Generation interrupted"))
            return
        self.say()
        self.history.append((query, response))

    def run(self) -> None:
        self.say(WELCOME)
        while True:
            try:
                text = self.read_message()
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:
                self.say("\n" + self.style.info("(Ctrl-C: type :q or press Ctrl-D to leave)"))
                continue
            if not text.strip():
                continue  # an empty message is never sent
            if text.startswith(":"):
                verdict = self.handle_command(text)
                if verdict is True:
                    return
                if verdict is False:
                    continue
            try:
                self.reply(text)
            except ValueError as err:  # e.g. the conversation outgrew the context
                self.say(self.style.warn(f"[ERROR] {err}"))
