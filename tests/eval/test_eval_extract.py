"""Answer extraction edge cases (the reference's quirks included) and the scores."""

from __future__ import annotations

import pytest

from qwenlm.eval.extract import (
    GSM8K_BASE_CUTS,
    HUMANEVAL_BASE_CUTS,
    INVALID,
    chat_choice_answer,
    cut_at,
    gsm8k_base_answer,
    gsm8k_chat_correct,
    gsm8k_chat_number,
    gsm8k_gold,
    humaneval_chat_code,
    parse_react,
)
from qwenlm.eval.metrics import choice_summary, pass_at_k, qwen_token_string, rouge_l_f1


# ---- GSM8K base ------------------------------------------------------------------------------------
def test_gsm8k_base_cuts_in_the_reference_order():
    text = "Step 1\nThe answer is 5\n\nQuestion: next"
    assert cut_at(text, GSM8K_BASE_CUTS) == "Step 1\nThe answer is 5"
    assert cut_at("a Question: b\n\nc", GSM8K_BASE_CUTS) == "a "
    assert cut_at("x<|endoftext|>y\n\n", GSM8K_BASE_CUTS) == "x"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The answer is 42", 42),
        ("The answer is 1,000", 0),  # the last digit run is "000"
        ("The answer is -5", 5),  # the sign is dropped
        ("The answer is 3.75", 75),  # so are decimals
        ("The answer is 08", INVALID),  # eval("08") fails in the reference
        ("The answer is 00", 0),
        ("no number at all", INVALID),
    ],
)
def test_gsm8k_base_answer_is_the_last_digit_run(completion, expected):
    assert gsm8k_base_answer(completion) == expected


def test_gsm8k_gold():
    assert gsm8k_gold("work\n#### 2,000") == 2000
    assert gsm8k_gold("#### -3") == -3
    assert gsm8k_gold("#### 1.5") == 1.5
    with pytest.raises(ValueError, match="no '#### <number>'"):
        gsm8k_gold("no marker")


# ---- GSM8K chat ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "number"),
    [("costs $1,234.50 in total", "1234.50"), ("it is +5", "5"), ("-0.5 and then 7.", "7."), ("x .5", ".5"),
     ("1,000,000 people", "1000000"), ("none", None)],
)  # fmt: skip
def test_gsm8k_chat_number(text, number):
    assert gsm8k_chat_number(text) == number


def test_gsm8k_chat_correct_uses_isclose():
    assert gsm8k_chat_correct("So she pays $18.00", "... #### 18")
    assert gsm8k_chat_correct("The total is 1,000 sheets", "#### 1000")
    assert gsm8k_chat_correct("about 0.33333", "1/3 is 0.333333")
    assert not gsm8k_chat_correct("The answer is 17", "#### 18")
    assert not gsm8k_chat_correct("I don't know", "#### 18")
    assert not gsm8k_chat_correct("it is 007", "#### 7")  # eval("007") fails: not a number to the reference


# ---- chat multiple choice --------------------------------------------------------------------------
CEVAL_OPTIONS = ("既不保证可靠，也不保证按序交付", "不保证可靠，但保证按序交付",
                 "保证可靠，但不保证按序交付", "既保证可靠，也保证按序交付")  # fmt: skip
CEVAL_Q = "关于传输层的面向连接服务的特性是____。"


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("答案是B", "B"),
        ("正确答案：C。", "C"),
        ("我选择 D", "D"),
        ("答案不是A，应该选C选项", "C"),  # (a) skips the negated 答案 and finds 选C
        ("B选项正确", "B"),
        ("A选项不正确，D选项正确", "D"),  # (b) skips the negated A
        ("(C) 是对的", "C"),  # (c) a bare leading letter
        ("我觉得应该是 B 吧", "B"),  # (d) the first standalone letter
        ("关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付", "D"),  # question -> 答案是, option -> letter
        ("它保证可靠，但不保证按序交付。", "C"),  # an option's text becomes its letter
        ("既不保证可靠也不保证按序交付", "A"),  # thefuzz fallback: closest option text
    ],
)
def test_chat_ceval_extraction(response, letter):
    assert chat_choice_answer("ceval", response, CEVAL_Q, CEVAL_OPTIONS) == letter


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The answer is C.", "C"),
        ("I would choose B", "B"),
        ("Answer: D", "D"),
        ("The answer isn't A; the answer is B", "B"),
        ("B is correct", "B"),
        ("A.", "A"),
        ("It must be PARIS.", "C"),  # case-insensitive option text -> letter
        ("Option D, I think", "D"),
        ("Rome Berlin", "A"),  # no letter: thefuzz picks the closest option
    ],
)
def test_chat_mmlu_extraction(response, letter):
    assert chat_choice_answer("mmlu", response, "Capital of France?", ("Rome", "Berlin", "Paris", "Madrid")) == letter


# ---- HumanEval -------------------------------------------------------------------------------------
def test_humaneval_base_cut_stops_at_a_blank_line_like_the_reference():
    out = "    x = 1\n\n    return x\ndef other(): pass"
    assert cut_at(out, HUMANEVAL_BASE_CUTS) == "    x = 1"  # the body after the blank line is lost (faithful)
    assert cut_at("    return 1\ndef g(): pass", HUMANEVAL_BASE_CUTS) == "    return 1\n"


def test_humaneval_chat_code_cascade():
    fenced = "Here:\n```python\nimport math\ndef add(a, b):\n    return a + b\n```\nDone."
    assert humaneval_chat_code(fenced, "add") == "    return a + b"
    bare = "def add(a, b):\n    c = a + b\n\n    return c\nprint(add(1, 2))"
    assert humaneval_chat_code(bare, "add") == "    c = a + b\n\n    return c"
    other = "def helper(x):\n    return x\n"
    assert humaneval_chat_code(other, "add") == "    return x"
    assert humaneval_chat_code("return a + b", "add") == "    return a + b"


# ---- plugin ----------------------------------------------------------------------------------------
def test_parse_react_normalises_the_action_input_with_json5():
    gen = "Thought: t\nAction: Search \nAction Input: {query: 'a', b: 1,}\nObservation: x\nFinal Answer: y"
    parsed = parse_react(gen)
    assert parsed["action"] == "Search"
    assert parsed["action_input"] == '{"b": 1, "query": "a"}'
    assert parsed["final_answer"] == "y"
    assert parse_react("Action: s\nAction Input: {not json\nObservation:")["action_input"] == ""


def test_plugin_rouge_runs_over_qwen_tokens(qwen_tokenizer):
    text = '{"query": "Paris weather"}'
    tokens = qwen_token_string(qwen_tokenizer, text)
    assert tokens.split() and " " in tokens and "".join(tokens.split(" ")) == text.replace(" ", "")
    assert rouge_l_f1(tokens, tokens) == 1.0
    assert 0 < rouge_l_f1(tokens, qwen_token_string(qwen_tokenizer, '{"query": "Paris"}')) < 1


# ---- scores ----------------------------------------------------------------------------------------
def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))  # 1 - C(3,2)/C(5,2)


def test_rouge_l_matches_hand_values():
    assert rouge_l_f1("a b c d", "a c d") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l_f1("a b", "c d") == 0.0
    assert rouge_l_f1("", "") == 0.0  # rouge-score scores an empty side 0


def test_macro_and_micro_averages():
    hits = {"a": [1, 1, 1, 1], "b": [0, 0]}
    groups = {"G": ["a", "b"], "Only a": ["a"], "Empty": ["zzz"]}
    macro = choice_summary(hits, groups, macro=True)
    micro = choice_summary(hits, groups, macro=False)
    assert macro["Average"] == pytest.approx(50.0) and micro["Average"] == pytest.approx(400 / 6)
    assert macro["Only a"] == 100.0 and "Empty" not in macro
