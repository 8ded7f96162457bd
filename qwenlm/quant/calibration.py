"""Calibration data for GPTQ: reading sample files, a small built-in set, and tokenisation.

A sample is plain text or a ChatML conversation. Files: `.jsonl` (one record per line), `.json` (a
list of records, the finetuning data format of spec 7.1) or `.txt` (one sample per paragraph, i.e.
blocks separated by blank lines). A record is `{"text": ...}`, `{"conversations": [{"from": "user",
"value": ...}, ...]}` or `{"messages": [{"role": "user", "content": ...}, ...]}`.

    samples = read_calibration_file("calib.jsonl")
    ids = tokenize_samples(tokenizer, samples, seq_len=512)     # list of [T] id lists
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..chat_format import Message, render_conversation, render_messages
from ..files import read_text_file
from ..tokenizer import QwenTokenizer

Sample = str | list[Message]

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file (and line)."""


def read_calibration_file(path: str | os.PathLike) -> list[Sample]:
    """Every sample of a `.jsonl`, `.json` or `.txt` calibration file, in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        CalibrationError: unknown extension, bad JSON or record, or no samples at all.
    """
    file = Path(path)
    try:
        text = read_text_file(file, "calibration file")
    except ValueError as err:
        raise CalibrationError(str(err)) from None
    suffix = file.suffix.lower()
    if suffix == ".txt":
        samples: list[Sample] = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    elif suffix == ".jsonl":
        samples = [
            _record(_json(line, file, n), file, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    elif suffix == ".json":
        records = _json(text, file, None)
        if not isinstance(records, list):
            raise CalibrationError(f"{file} must hold a JSON list of records, got {type(records).__name__}")
        samples = [_record(r, file, i) for i, r in enumerate(records)]
    else:
        raise CalibrationError(f"calibration file {file} must be .jsonl, .json or .txt, got {suffix or 'no suffix'!r}")
    samples = [s for s in samples if s]
    if not samples:
        raise CalibrationError(f"calibration file {file} has no samples")
    return samples


def _json(text: str, file: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{file} line {line}" if line is not None else str(file)
        raise CalibrationError(f"{where} is not valid JSON: {err}") from err


def _record(record: Any, file: Path, where: int) -> Sample:
    """One sample from a record; `where` is the line (jsonl) or list index (json) for messages."""
    label = f"{file} {'line' if file.suffix.lower() == '.jsonl' else 'record'} {where}"
    if not isinstance(record, Mapping):
        raise CalibrationError(f"{label}: expected an object, got {type(record).__name__}")
    if isinstance(record.get("text"), str):
        return record["text"]
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list):
        raise CalibrationError(f"{label}: expected a 'text' string or a 'messages' / 'conversations' list")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise CalibrationError(f"{label}: turn {i} is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _ROLES or not isinstance(content, str):
            raise CalibrationError(
                f"{label}: turn {i} needs a role/from in {sorted(_ROLES)} and a string content/value, got {dict(turn)}"
            )
        messages.append({"role": _ROLES[role], "content": content})
    return messages


def tokenize_samples(tokenizer: QwenTokenizer, samples: Sequence[Sample], seq_len: int) -> list[list[int]]:
    """Token ids of each sample, truncated to its first `seq_len` tokens.

    Text is encoded as it is; a conversation is rendered in ChatML the way finetuning renders it
    (ending with an assistant turn), or as a generation prompt when it ends with a user turn.

    Raises:
        CalibrationError: a conversation whose roles are out of order (the index is named).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    rows = []
    for i, sample in enumerate(samples):
        if isinstance(sample, str):
            ids = tokenizer.encode(sample)
        else:
            try:
                if sample and sample[-1]["role"] == "assistant":
                    ids, _ = render_conversation(tokenizer, sample)
                else:
                    ids = render_messages(tokenizer, sample)[1]
            except ValueError as err:
                raise CalibrationError(f"calibration sample {i}: {err}") from err
        rows.append(ids[:seq_len])
    return rows


def builtin_samples() -> list[Sample]:
    """The small built-in calibration set: varied English and Chinese prose, code, maths and chats.

    Real calibration data close to the model's use (e.g. its finetuning conversations) is better.
    """
    chats: list[Sample] = [
        [{"role": "user", "content": user}, {"role": "assistant", "content": reply}] for user, reply in _CHATS
    ]
    return [*_PARAGRAPHS, *chats]


_PARAGRAPHS: tuple[str, ...] = (
    "The river had risen overnight, and by morning the lower fields were a sheet of brown water. Farmers stood "
    "at the edge of the road, counting what they could still save: a few bales of hay, the tractor, the dog "
    "that refused to leave the porch. Nobody spoke much. Floods in this valley came every decade or so, and "
    "the old people said you could read them in the colour of the sky the week before.",
    "Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, water is split "
    "and oxygen is released, while ATP and NADPH are produced. The Calvin cycle then uses these molecules to "
    "fix carbon dioxide into three-carbon sugars, which the plant assembles into glucose, starch and cellulose.",
    "To reset your password, open the settings page and choose 'Account'. Select 'Security', then 'Change "
    "password'. You will be asked for your current password and a new one of at least twelve characters. If you "
    "have forgotten the current password, use the link on the sign-in page instead; a code will be sent to you.",
    "In 1869 the first transcontinental railroad in the United States was completed at Promontory Summit, "
    "Utah. The journey from New York to San Francisco, which had taken months by wagon or ship, could now be "
    "made in about a week. Trade, migration and the postal service all changed within a few years.",
    'def merge_sorted(a, b):\n    """Merge two sorted lists into one sorted list."""\n    out, i, j = [], 0, 0\n'
    "    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n"
    "        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n",
    "SELECT customer_id, COUNT(*) AS orders, SUM(total) AS revenue\nFROM orders\nWHERE created_at >= "
    "'2023-01-01'\nGROUP BY customer_id\nHAVING COUNT(*) > 3\nORDER BY revenue DESC\nLIMIT 20;",
    "Let x be a real number with x^2 - 5x + 6 = 0. Factoring gives (x - 2)(x - 3) = 0, so x = 2 or x = 3. "
    "The sum of the roots is 5 and their product is 6, which agrees with Vieta's formulas: for ax^2 + bx + c, "
    "the roots sum to -b/a and multiply to c/a.",
    "Dear Ms. Alvarez,\n\nThank you for your letter of 12 March. We have reviewed the invoice you mentioned and "
    "agree that the shipping charge was applied twice. A refund of 48.50 euros has been issued to your card and "
    "should appear within five working days. We apologise for the inconvenience.\n\nKind regards,\nCustomer Care",
    "A good sourdough starts with a lively starter. Feed it the night before, so that it has doubled and smells "
    "slightly sweet by morning. Mix 500 g of flour with 350 g of water, rest for an hour, then add 100 g of "
    "starter and 10 g of salt. Fold the dough every half hour for two hours, shape it, and let it rise in the "
    "fridge overnight before baking at 250 degrees.",
    "The mitochondrion is often called the powerhouse of the cell, but it does more than produce ATP. It helps "
    "regulate calcium, takes part in programmed cell death, and carries its own small circular genome, a trace "
    "of its origin as a free-living bacterium taken up by an ancestral cell more than a billion years ago.",
    "Q: What is the capital of Australia?\nA: Canberra. Many people guess Sydney or Melbourne, but Canberra was "
    "chosen in 1908 as a compromise between the two rival cities and purpose-built as the seat of government.",
    "Interest rates affect almost every part of the economy. When a central bank raises its policy rate, "
    "borrowing becomes more expensive, mortgages cost more, and companies delay investment. Savers earn more, "
    "the currency tends to strengthen, and inflation usually slows, though often with a lag of a year or more.",
    "春天来了，山坡上的桃花一片一片地开了。孩子们放学后总爱跑到河边，捡几块扁平的石头，比赛谁打的水漂更远。"
    "傍晚的风带着泥土和青草的味道，村口的老槐树下，几位老人坐着聊天，说今年的雨水应该不错。",
    "人工智能是计算机科学的一个分支，研究如何让机器完成通常需要人类智能的任务，例如理解语言、识别图像、"
    "做出决策等。近年来，深度学习的发展使得语音识别和机器翻译的准确率大幅提高，但模型的可解释性和安全性"
    "仍然是重要的研究问题。",
    "北京是中国的首都，有三千多年的建城史。故宫、天坛、颐和园和长城都是著名的旅游景点。每年秋天，"
    "香山的红叶吸引大量游客前来观赏。北京的小吃也很有名，比如炸酱面、豆汁和糖葫芦。",
    "请按以下步骤安装软件：首先下载安装包并双击运行；然后阅读许可协议，勾选“我同意”；接着选择安装目录，"
    "建议使用默认路径；最后点击“安装”，等待进度条完成后重新启动电脑。",
    "《论语》中说：“学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？”"
    "这几句话强调了学习、交友和修身的重要性，两千多年来一直被人们传诵。",
    "一个长方形的长是12厘米，宽是8厘米，它的周长是多少？解：长方形的周长等于（长＋宽）×2，"
    "所以周长是（12＋8）×2＝40厘米。它的面积是12×8＝96平方厘米。",
    "近年来，新能源汽车在中国迅速普及。与传统燃油车相比，电动汽车的使用成本更低，噪音更小，"
    "但续航里程和充电设施仍是消费者关心的问题。许多城市正在加快建设公共充电桩。",
    "做番茄炒蛋的方法很简单：先把鸡蛋打散，加一点盐；锅里放油，把鸡蛋炒到凝固后盛出。"
    "再放少许油，下番茄块翻炒出汁，加入糖和盐调味，最后倒回鸡蛋，翻炒均匀即可出锅。",
    "量子计算利用量子比特的叠加和纠缠来进行运算。对于某些问题，例如大整数分解和量子系统模拟，"
    "量子计算机在理论上比经典计算机快得多。不过，目前的量子计算机规模还很小，错误率也比较高。",
    "会议纪要：2024年5月8日，项目组讨论了第二季度的开发计划。决定优先完成用户登录模块的重构，"
    "并在月底前上线测试版本。张伟负责后端接口，李娜负责前端页面，下周三再开会检查进度。",
    "Mixed text: the model 通义千问 (Qwen) was trained on a large multilingual corpus. 它支持中文和英文，"
    "也能写代码，例如 print('你好，世界')。Numbers like 3.14159 and dates like 2023-09-25 appear often.",
    "Breaking news: heavy snow has closed the main highway through the pass. Authorities expect it to reopen "
    "tomorrow afternoon once ploughs have cleared the drifts. Travellers are advised to carry chains, water and "
    "warm clothing, and to check the road report before setting out.",
)

_CHATS: tuple[tuple[str, str], ...] = (
    ("你好，请介绍一下你自己。", "你好！我是一个人工智能助手，可以回答问题、写作、翻译和编写代码。"
     "有什么可以帮你的吗？"),
    ("How do I reverse a string in Python?", "Use slicing with a step of -1: `reversed_text = text[::-1]`. "
     "For example, `'hello'[::-1]` returns `'olleh'`."),
    ("把这句话翻译成英文：今天天气很好，我们去公园散步吧。",
     "The weather is lovely today, let's go for a walk in the park."),
    ("What is the difference between a list and a tuple?", "A list is mutable: you can add, remove or change "
     "items. A tuple is immutable once created, which makes it hashable and usable as a dictionary key."),
    ("给我写一首关于秋天的短诗。", "秋风起，落叶黄，\n雁南飞，稻花香。\n一轮明月挂天上，\n照我归途到故乡。"),
    ("Summarise the plot of Romeo and Juliet in two sentences.", "Two young lovers from feuding families in "
     "Verona marry in secret. A chain of misunderstandings leads both to take their own lives, which finally "
     "reconciles their families."),
    ("1到100的整数之和是多少？", "用高斯求和公式：(1+100)×100÷2＝5050。所以1到100的整数之和是5050。"),
    ("Give me three tips for better sleep.", "1. Keep a regular schedule, even at weekends. 2. Avoid screens "
     "and caffeine in the evening. 3. Keep your bedroom cool, dark and quiet."),
)  # fmt: skip
