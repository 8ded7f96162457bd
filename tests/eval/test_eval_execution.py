"""The HumanEval sandbox: a sample passes only if its tests ran to the end, within bounded time and memory."""

from __future__ import annotations

import json
import time

import pytest
from benchmark_files import HUMANEVAL

from qwenlm.cli import main
from qwenlm.eval.execution import SandboxRunner, check_program

PROMPT = 'def add(a, b):\n    """Sum."""\n'
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
CASES = {
    "correct": ("    return a + b\n", True),
    "wrong": ("    return a - b\n", False),
    "infinite loop": ("    while True:\n        pass\n", False),
    "sys.exit(0) before the tests": ("    return a + b\nimport sys\nsys.exit(0)\n", False),
    "SystemExit(0) raised inside": ("    raise SystemExit(0)\n", False),
    "os._exit(0)": ("    return a + b\nimport os\nos._exit(0)\n", False),
    "huge allocation": ("    return a + b\nx = bytearray(1 << 40)\n", False),
    "timeout swallowed": (
        "    return a + b\ntry:\n    while True: pass\nexcept BaseException:\n    pass\nwhile True: pass\n",
        False,
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def sandbox():
    return SandboxRunner(timeout=1.0, workers=4, memory_mb=512)


def test_only_programs_whose_tests_finish_pass(sandbox):
    programs = [check_program(PROMPT, completion, TEST, "add") for completion, _ in CASES.values()]
    start = time.monotonic()
    results = sandbox.run_all(programs)
    elapsed = time.monotonic() - start
    assert {name: r.passed for name, r in zip(CASES, results, strict=True)} == {n: p for n, (_, p) in CASES.items()}
    by_name = dict(zip(CASES, results, strict=True))
    assert by_name["correct"].result == "passed"
    assert by_name["infinite loop"].result == "timed out"
    assert by_name["timeout swallowed"].result == "timed out"
    assert "MemoryError" in by_name["huge allocation"].result
    assert "exited before its tests finished" in by_name["os._exit(0)"].result
    assert elapsed < 2 * (1.0 + 1.0) + 5  # two rounds of 4 workers, each bounded by timeout + 1 s (+ start-up)


def test_the_child_is_isolated(sandbox, tmp_path):
    assert sandbox.isolation["timeout_s"] == 1.0 and sandbox.isolation["network"]
    marker = tmp_path / "marker"
    probe = (f"import os\nassert os.getcwd() != {str(tmp_path)!r}\nassert 'QWENLM_SECRET' not in os.environ\n"
             "import sys\nassert sys.stdin.read() == ''\n")  # fmt: skip
    import os

    os.environ["QWENLM_SECRET"] = "1"
    try:
        assert sandbox.run(probe).passed
    finally:
        del os.environ["QWENLM_SECRET"]
    writer = f"open({str(marker)!r}, 'w').write('x' * (64 << 20))\n"  # past RLIMIT_FSIZE (16 MB)
    assert not sandbox.run(writer).passed
    if sandbox.netns:  # a network namespace has no route out, not even to this machine's other interfaces
        net = "import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=0.5)\n"
        assert "Network is unreachable" in sandbox.run(net).result


def test_cli_scores_predictions_into_human_eval_results_lines(eval_data, tmp_path):
    samples = tmp_path / "samples.jsonl"
    rows = [{"task_id": "HumanEval/1", "completion": "    return 2 * x\n"},
            {"task_id": "HumanEval/0", "completion": "    import sys; sys.exit(0)\n"},
            {"task_id": "HumanEval/0", "completion": HUMANEVAL[0]["canonical_solution"]},
            {"task_id": "HumanEval/1", "completion": "    while True: pass\n"}]  # fmt: skip
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "he.jsonl"
    main(["eval", "humaneval", "--predictions", str(samples),
          "--data", str(eval_data / "humaneval"), "--output", str(out), "--timeout", "1"])  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["completion"], r["passed"]) for r in lines] == [
        ("HumanEval/1", rows[0]["completion"], True), ("HumanEval/0", rows[1]["completion"], False),
        ("HumanEval/0", rows[2]["completion"], True), ("HumanEval/1", rows[3]["completion"], False),
    ]  # fmt: skip
    assert lines[3]["result"] == "timed out"
    results = json.loads((tmp_path / "he.results.json").read_text())
    assert results["summary"] == {"pass@1": 50.0}
    assert results["provenance"]["sandbox"]["timeout_s"] == 1.0
