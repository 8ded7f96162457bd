"""Answer extraction of the reference's scripts, quirks included (notes 1.3-1.8). Pure functions of text.

    cut_at(text, GSM8K_BASE_CUTS)      # the base GSM8K / HumanEval post-processing
    gsm8k_base_answer("... 1,000")      # 0: the last digit run, as the reference reads it
    chat_choice_answer("ceval", "答案是B", question, options)   # "B"

Where the reference calls `eval()` on a number it found, `ast.literal_eval` gives the same value (or
the same failure, e.g. "08"), without running text from a model.
"""

from __future__ import annotations

import ast
import json
import math
import re
import textwrap

from .data import LETTERS

INVALID = "[invalid]"
GSM8K_BASE_CUTS = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")
HUMANEVAL_BASE_CUTS = ("<|endoftext|>", "\n\n\n", "\n\n", "def ")


def cut_at(text: str, delimiters: tuple[str, ...]) -> str:
    """`text.split(d)[0]` for each delimiter in turn (which is the text before the earliest delimiter)."""
    for delimiter in delimiters:
        text = text.split(delimiter)[0]
    return text


def _number(text: str) -> int | float | None:
    """What the reference's `eval(text)` gives for a numeric string, or None where it raises."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------
_GOLD_BASE = re.compile(r"#### (\-?[0-9\.\,]+)")
_LAST_NUMBER_CHAT = re.compile(r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)")


def gsm8k_gold(answer: str) -> int | float:
    """The `#### N` value of a GSM8K answer (commas dropped), as evaluate_gsm8k.py reads it."""
    match = _GOLD_BASE.search(answer)
    value = _number(match.group(1).strip().replace(",", "")) if match else None
    if value is None:
        raise ValueError(f"no '#### <number>' answer in {answer[-80:]!r}")
    return value


def gsm8k_base_answer(completion: str) -> int | float | str:
    """evaluate_gsm8k.py: the last run of digits (no sign, no decimals; "1,000" -> 0; "08" -> invalid)."""
    runs = re.findall(r"\d+", completion)
    value = _number(runs[-1]) if runs else None
    return INVALID if value is None else value


def gsm8k_chat_number(text: str) -> str | None:
    """evaluate_chat_gsm8k.py: the last number (sign, thousands commas and decimals allowed), "," and "+" removed."""
    matches = list(_LAST_NUMBER_CHAT.finditer(text))
    if not matches:
        return None
    return matches[-1].group().replace(",", "").replace("+", "").strip()


def gsm8k_chat_correct(completion: str, answer: str) -> bool:
    """Both numbers extracted the same way; equal within abs_tol 1e-4 (math.isclose)."""
    gold, pred = gsm8k_chat_number(answer), gsm8k_chat_number(completion)
    if gold is None:
        raise ValueError(f"no number in the reference answer {answer[-80:]!r}")
    gold_value, pred_value = _number(gold), (_number(pred) if pred is not None else None)
    if gold_value is None or pred_value is None:
        return False
    return math.isclose(gold_value, pred_value, rel_tol=0, abs_tol=1e-4)


# --------------------------------------------------------------------------------------------------
# Chat multiple choice
# --------------------------------------------------------------------------------------------------
_CEVAL_CASCADE = (
    # 答案是A | 选项是A | 应该选A选项
    r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|选|为|：|:|】))"
    r"[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)",
    # A选项正确 | A选项符合题意
    r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))[^ABCD]{0,4}?(?:正确|对[的，。：]|符合)",
    r"^[\(（]?(A|B|C|D)(?:。|\)|）|\.|，|,|．|：|:|$)",  # a bare leading letter
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",  # the first standalone letter
)
_MMLU_CASCADE = (
    r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:|is|:|be))\b)"
    r"[^ABCD]{0,20}?\b(A|B|C|D)\b",
    r"\b(A|B|C|D)\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b",
    r"^(A|B|C|D)(?:\.|,|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
)


def _ceval_preprocess(response: str, question: str, options: tuple[str, ...]) -> str:
    """Replace the question's last sentence before the blank by 答案是, drop the part after it, and option
    texts (longest first) by their letters."""
    parts = question.rstrip("。").split("。")[-1].split("_")
    if len(parts[0].strip()) > 4:
        response = response.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        response = response.replace(parts[-1], "")
    for letter, option in sorted(zip(LETTERS, options, strict=True), key=lambda x: len(x[1]), reverse=True):
        response = response.replace(option.rstrip("。"), letter)
    return response


def _mmlu_preprocess(response: str, options: tuple[str, ...]) -> str:
    for letter, option in sorted(zip(LETTERS, options, strict=True), key=lambda x: len(x[1]), reverse=True):
        response = re.compile(re.escape(option.rstrip(".")), re.IGNORECASE).sub(letter, response)
    return response


def _fuzzy_choice(text: str, options: tuple[str, ...]) -> str | None:
    from thefuzz import process  # the reference's fallback; an optional dependency (qwenlm[eval])

    best = process.extractOne(text, list(options))
    return None if best is None else LETTERS[list(options).index(best[0])]


def chat_choice_answer(task: str, response: str, question: str, options: tuple[str, ...]) -> str | None:
    """The letter a chat model chose: C-Eval's rules (also used for CMMLU) or MMLU's; thefuzz as the last resort."""
    if task == "mmlu":
        text, cascade = _mmlu_preprocess(response, options), _MMLU_CASCADE
    else:
        text, cascade = _ceval_preprocess(response, question, options), _CEVAL_CASCADE
    for pattern in cascade:
        match = re.search(pattern, text)
        if match is not None:
            return match.group(1)
    return _fuzzy_choice(text, options)


# --------------------------------------------------------------------------------------------------
# HumanEval (chat)
# --------------------------------------------------------------------------------------------------
def humaneval_chat_code(response: str, entry_point: str) -> str:
    """The function body a chat model wrote (evaluate_chat_humaneval.py): a fenced block with `def entry_point`,
    else `def entry_point...:` up to the first unindented line, else any `def`, else the whole reply indented."""
    patterns = (
        rf"```(?:[Pp]ython\n)?.*?def\s+{entry_point}.*?:\n(.*?)\n```",
        rf"def\s+{entry_point}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
        r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
    )
    for pattern in patterns:
        match = re.search(pattern, response, re.DOTALL)
        if match is not None:
            return match.group(1)
    return textwrap.indent(response, " " * 4)


# --------------------------------------------------------------------------------------------------
# Tool use (evaluate_plugin.py)
# --------------------------------------------------------------------------------------------------
def _between(text: str, start: str, end: str) -> str:
    """text[find(start)+len(start) : find(end)], with str.find's -1 when a marker is missing (as the reference)."""
    return text[text.find(start) + len(start) : text.find(end)].strip()


def parse_react(response: str) -> dict[str, str]:
    """evaluate_plugin.py `process_res`: the first Action / Action Input, the input normalised through json5."""
    response += "\n"  # the reference's "fix not-find bug": a missing end marker cuts the last character
    action_input = _between(response, "Action Input:", "Observation:")
    try:
        import json5

        action_input = json.dumps(json5.loads(action_input), ensure_ascii=False, sort_keys=True)
    except ImportError as err:
        raise RuntimeError("the plugin task needs json5: pip install 'qwenlm[eval]'") from err
    except Exception:  # unparsable input: the reference scores it as ""
        action_input = ""
    return {
        "thought": response[: response.find("Action:")].strip(),
        "action": _between(response, "Action:", "Action Input:"),
        "action_input": action_input,
        "observation": response[
            response.find("Observation:") + len("Observation:") : response.rfind("Thought:")
        ].strip(),
        "final_answer": response[response.find("Final Answer:") + len("Final Answer:") :].strip(),
    }
