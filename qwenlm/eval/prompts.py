"""The reference's prompt templates, byte for byte (spec 9, notes 1.2-1.7). Pure functions of the data.

choice_prompt("mmlu", "anatomy", shots, item)      # header + 5 shots + "Question: ...\nAnswer:"
chat_choice_prompt("ceval", item)                   # 0-shot chat message
"""

from __future__ import annotations

import re

from .data import LETTERS, Question

MMLU_CHAT_HEADER = (
    "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
    "as the answer to this question.\n\n"
)
GSM8K_BASE_QUESTION = "\nQuestion: {question}\nLet's think step by step\n"

# evaluate_chat_gsm8k.py --use-fewshot: four built-in exemplars (verbatim, typos included).
GSM8K_CHAT_SHOTS = (
    "Question: Angelo and Melanie want to plan how many hours over the next week they should study together for "
    "their test next week. They have 2 chapters of their textbook to study and 4 worksheets to memorize. They "
    "figure out that they should dedicate 3 hours to each chapter of their textbook and 1.5 hours for each "
    "worksheet. If they plan to study no more than 4 hours each day, how many days should they plan to study "
    "total over the next week if they take a 10-minute break every hour, include 3 10-minute snack breaks each "
    "day, and 30 minutes for lunch each day?\nLet's think step by step\n"
    "Angelo and Melanie think they should dedicate 3 hours to each of the 2 chapters, 3 hours x 2 chapters = 6 "
    "hours total.\nFor the worksheets they plan to dedicate 1.5 hours for each worksheet, 1.5 hours x 4 "
    "worksheets = 6 hours total.\nAngelo and Melanie need to start with planning 12 hours to study, at 4 hours a "
    "day, 12 / 4 = 3 days.\nHowever, they need to include time for breaks and lunch. Every hour they want to "
    "include a 10-minute break, so 12 total hours x 10 minutes = 120 extra minutes for breaks.\nThey also want to "
    "include 3 10-minute snack breaks, 3 x 10 minutes = 30 minutes.\nAnd they want to include 30 minutes for "
    "lunch each day, so 120 minutes for breaks + 30 minutes for snack breaks + 30 minutes for lunch = 180 "
    "minutes, or 180 / 60 minutes per hour = 3 extra hours.\nSo Angelo and Melanie want to plan 12 hours to study "
    "+ 3 hours of breaks = 15 hours total.\nThey want to study no more than 4 hours each day, 15 hours / 4 hours "
    "each day = 3.75\nThey will need to plan to study 4 days to allow for all the time they need.\nThe answer is "
    "4\n\n"
    "Question: Mark's basketball team scores 25 2 pointers, 8 3 pointers and 10 free throws.  Their opponents "
    "score double the 2 pointers but half the 3 pointers and free throws.  What's the total number of points "
    "scored by both teams added together?\nLet's think step by step\n"
    "Mark's team scores 25 2 pointers, meaning they scored 25*2= 50 points in 2 pointers.\nHis team also scores 6 "
    "3 pointers, meaning they scored 8*3= 24 points in 3 pointers\nThey scored 10 free throws, and free throws "
    "count as one point so they scored 10*1=10 points in free throws.\nAll together his team scored 50+24+10= 84 "
    "points\nMark's opponents scored double his team's number of 2 pointers, meaning they scored 50*2=100 points "
    "in 2 pointers.\nHis opponents scored half his team's number of 3 pointers, meaning they scored 24/2= 12 "
    "points in 3 pointers.\nThey also scored half Mark's team's points in free throws, meaning they scored 10/2=5 "
    "points in free throws.\nAll together Mark's opponents scored 100+12+5=117 points\nThe total score for the "
    "game is both team's scores added together, so it is 84+117=201 points\nThe answer is 201\n\n"
    "Question: Bella has two times as many marbles as frisbees. She also has 20 more frisbees than deck cards. If "
    "she buys 2/5 times more of each item, what would be the total number of the items she will have if she "
    "currently has 60 marbles?\nLet's think step by step\n"
    "When Bella buys 2/5 times more marbles, she'll have increased the number of marbles by 2/5*60 = 24\nThe "
    "total number of marbles she'll have is 60+24 = 84\nIf Bella currently has 60 marbles, and she has two times "
    "as many marbles as frisbees, she has 60/2 = 30 frisbees.\nIf Bella buys 2/5 times more frisbees, she'll have "
    "2/5*30 = 12 more frisbees.\nThe total number of frisbees she'll have will increase to 30+12 = 42\nBella also "
    "has 20 more frisbees than deck cards, meaning she has 30-20 = 10 deck cards\nIf she buys 2/5 times more deck "
    "cards, she'll have 2/5*10 = 4 more deck cards.\nThe total number of deck cards she'll have is 10+4 = "
    "14\nTogether, Bella will have a total of 14+42+84 = 140 items\nThe answer is 140\n\n"
    "Question: A group of 4 fruit baskets contains 9 apples, 15 oranges, and 14 bananas in the first three "
    "baskets and 2 less of each fruit in the fourth basket. How many fruits are there?\nLet's think step by "
    "step\n"
    "For the first three baskets, the number of apples and oranges in one basket is 9+15=24\nIn total, together "
    "with bananas, the number of fruits in one basket is 24+14=38 for the first three baskets.\nSince there are "
    "three baskets each having 38 fruits, there are 3*38=114 fruits in the first three baskets.\nThe number of "
    "apples in the fourth basket is 9-2=7\nThere are also 15-2=13 oranges in the fourth basket\nThe combined "
    "number of oranges and apples in the fourth basket is 13+7=20\nThe fourth basket also contains 14-2=12 "
    "bananas.\nIn total, the fourth basket has 20+12=32 fruits.\nThe four baskets together have 32+114=146 "
    "fruits.\nThe answer is 146\n\n"
)


# --------------------------------------------------------------------------------------------------
# Base multiple choice (evaluate_{ceval,cmmlu,mmlu}.py)
# --------------------------------------------------------------------------------------------------
def format_choice_example(task: str, item: Question, include_answer: bool) -> str:
    """One question: C-Eval/CMMLU "问题：...\\n答案：", MMLU "Question: ...\\nAnswer:" (a shot adds its letter)."""
    question_word, answer_word, gap = ("Question: ", "\nAnswer:", " ") if task == "mmlu" else ("问题：", "\n答案：", "")
    text = question_word + item.question
    for letter, option in zip(LETTERS, item.options, strict=True):
        text += f"\n{letter}. {option}"
    if include_answer:
        return text + answer_word + gap + f"{item.answer}\n\n"
    return text + answer_word


def few_shot_prefix(task: str, subject: str, shots: list[Question], k: int) -> str:
    """What comes before every item of a subject: MMLU's header, then the first k dev rows with answers."""
    prefix = ""
    if task == "mmlu":
        prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return prefix + "".join(format_choice_example(task, shot, True) for shot in shots[:k])


def choice_prompt(task: str, subject: str, shots: list[Question], item: Question, k: int = 5) -> str:
    return few_shot_prefix(task, subject, shots, k) + format_choice_example(task, item, False)


def choice_token_texts(task: str) -> tuple[str, ...]:
    """The tokens whose next-token logits are compared: " A".." D" for MMLU, "A".."D" for C-Eval/CMMLU."""
    return tuple(f" {x}" for x in LETTERS) if task == "mmlu" else LETTERS


# --------------------------------------------------------------------------------------------------
# Chat multiple choice (evaluate_chat_{ceval,mmlu}.py; CMMLU uses the C-Eval form)
# --------------------------------------------------------------------------------------------------
def chat_choice_prompt(task: str, item: Question) -> str:
    options = "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, item.options, strict=True))
    if task == "mmlu":
        return MMLU_CHAT_HEADER + item.question + "\n" + options
    return item.question + "\n\n" + options


# --------------------------------------------------------------------------------------------------
# GSM8K and HumanEval
# --------------------------------------------------------------------------------------------------
def gsm8k_base_prompt(fewshot: str, question: str) -> str:
    """evaluate_gsm8k.py: the gsm8k_prompt.txt text, then the question."""
    return fewshot + GSM8K_BASE_QUESTION.format(question=question)


def gsm8k_chat_prompt(question: str, use_fewshot: bool) -> str:
    """evaluate_chat_gsm8k.py: the bare question, or the 4 built-in shots + the question (no trailing newline)."""
    if not use_fewshot:
        return question
    return GSM8K_CHAT_SHOTS + f"Question: {question}\nLet's think step by step"


def humaneval_chat_prompt(prompt: str, entry_point: str) -> str:
    """evaluate_chat_humaneval.py (HumanEvalPack style): signature, the docstring with lines stripped, the prompt."""
    signature = re.search(rf"def\s+({entry_point}.*?):\s*\n", prompt)
    docstring = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", prompt, re.DOTALL)
    if signature is None or docstring is None:
        raise ValueError(f"HumanEval prompt has no `def {entry_point}(...):` line or no docstring")
    description = "\n".join(line.strip() for line in docstring.group(1).split("\n"))
    return f"Write a Python function `{signature.group(1)}` to solve the following problem:\n{description}\n{prompt}"
