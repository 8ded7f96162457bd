"""The third-party clients people point at `qwenlm serve`, against the real server on a tiny random-weight
checkpoint: lm-evaluation-harness (`lm_eval --model local-completions`, remote tokenizer) scoring a local
multiple-choice task and a perplexity task exactly as the model's own log-probabilities say; the echo
contract of /v1/completions that scorers rely on; LangChain's `with_structured_output` (the grammar makes
a random model produce a valid object); forced tool calls; and the openai SDK's Responses API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from server_process import running_server

pytest.importorskip("lm_eval")
langchain_openai = pytest.importorskip("langchain_openai")

API_KEY = "sk-clients"
TASKS = Path(__file__).parent / "data" / "lm_eval"
MAX_LENGTH = 24  # lm-eval's context window here: the long perplexity document needs several windows
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer",
           "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve-clients") / "server.log"
    args = ["--api-key", API_KEY, "--served-model-name", "qwen-tiny", "--max-num-seqs", "4", "--max-model-len", "1024",
            "--cpu-only", "--dtype", "float32"]  # fmt: skip
    with running_server(tiny_checkpoint, log_path, *args) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V] log p(. | ids[:p]) for p >= 1: one plain forward, the whole output vocabulary."""
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0, :-1].float().log_softmax(-1)


def _score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """lm-eval's loglikelihood: sum log p(continuation | context) and whether it is the greedy choice."""
    logprobs = _logprobs(model, context + continuation)[len(context) - 1 :]
    chosen = logprobs.gather(-1, torch.tensor(continuation)[:, None])[:, 0]
    greedy = bool((logprobs[:, :151851].argmax(-1) == torch.tensor(continuation)).all())
    return float(chosen.sum()), greedy


# ---- lm-evaluation-harness ------------------------------------------------------------------------


def test_lm_eval_local_completions_scores_are_the_models_own_logprobs(server, tiny_model, qwen_tokenizer, tmp_path):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model_args = (f"model=qwen-tiny,base_url={server}/v1/completions,tokenizer_backend=remote,"
                  f"max_length={MAX_LENGTH},num_concurrent=1,max_retries=1,auth_token={API_KEY}")  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "qwenlm_tiny_mc,qwenlm_tiny_ppl", "--include_path", str(TASKS), "--log_samples",
               "--output_path", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, cwd=TASKS, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {path.name.split("_2")[0]: [json.loads(line) for line in path.read_text().splitlines()]
               for path in (tmp_path / "out").rglob("samples_*.jsonl")}  # fmt: skip

    def encode(text: str) -> list[int]:
        return qwen_tokenizer.encode(text)

    for sample in samples["samples_qwenlm_tiny_mc"]:
        scores = []
        for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = args["arg_0"], args["arg_1"]  # lm-eval's _encode_pair split:
            whole, ctx = encode(context + continuation), encode(context)
            expected, greedy = _score(tiny_model, ctx, whole[len(ctx) :])
            got, got_greedy = float(resp[0][0]), resp[0][1] == "True"
            assert got == pytest.approx(expected, abs=2e-4) and got_greedy == greedy
            scores.append(expected)
        assert sample["acc"] == float(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["answer"])
    windows_seen = 0
    for sample in samples["samples_qwenlm_tiny_ppl"]:
        windows = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(
                token_list=encode(sample["doc"]["text"]), prefix_token=151643, max_seq_len=MAX_LENGTH - 2, context_len=1
            )
        ]
        expected = sum(_score(tiny_model, ctx, cont)[0] for ctx, cont in windows)  # fmt: skip
        assert float(sample["resps"][0][0]) == pytest.approx(expected, abs=1e-3)
        windows_seen = max(windows_seen, len(windows))
    assert windows_seen >= 2  # the long document really was scored window by window


# ---- the echo contract (what `qwenlm eval --endpoint` and other scorers read) ----------------------


def test_echo_logprobs_of_token_id_prompts_match_the_model(client, tiny_model, qwen_tokenizer):
    prompts = [qwen_tokenizer.encode("The capital of France is Paris"), qwen_tokenizer.encode("你好，世界")]
    for max_tokens in (0, 1):
        reply = client.completions.create(model="whatever", prompt=prompts, echo=True, logprobs=1,
                                          max_tokens=max_tokens, temperature=0)  # fmt: skip
        for choice in sorted(reply.choices, key=lambda c: c.index):
            ids, lp = prompts[choice.index], choice.logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + max_tokens
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            direct = _logprobs(tiny_model, ids)
            expected = direct.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(lp.token_logprobs[1 : len(ids)]), expected, rtol=0, atol=2e-4)
            for p, top in enumerate(lp.top_logprobs[1 : len(ids)]):
                (best,) = top.values()
                assert best == pytest.approx(float(direct[p, :151851].max()), abs=2e-4)
    # The end token, when it is what was generated, is listed too (lm-eval drops the last entry).
    reply = client.completions.create(model="whatever", prompt=prompts[0], echo=True, logprobs=1, max_tokens=1,
                                      temperature=0, logit_bias={"151643": 100})  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.logprobs.tokens[-1] == "<|endoftext|>"
    assert len(choice.logprobs.tokens) == len(prompts[0]) + 1 and choice.text == qwen_tokenizer.decode(prompts[0])


# ---- structured output and tools ----------------------------------------------------------------


class Weather(BaseModel):
    """A weather report."""

    city: Literal["Paris", "Rome", "Tokyo"]
    temperature: int = Field(ge=-30, le=50)
    sunny: bool


def test_langchain_with_structured_output_gets_a_valid_object_from_random_weights(server):
    llm = langchain_openai.ChatOpenAI(model="qwen", base_url=f"{server}/v1", api_key=API_KEY, temperature=0,
                                      max_tokens=60, max_retries=0)  # fmt: skip
    report = llm.with_structured_output(Weather).invoke("What is the weather in Paris?")  # default: json_schema
    assert isinstance(report, Weather)
    raw = llm.with_structured_output(Weather, include_raw=True).invoke("And in Rome?")
    assert raw["parsing_error"] is None and json.loads(raw["raw"].content) == raw["parsed"].model_dump()


def test_a_named_tool_choice_gets_a_call_with_valid_arguments_streaming_or_not(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
             {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]  # fmt: skip
    ask = {"model": "qwen", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0,
           "max_tokens": 300}  # fmt: skip
    reply = client.chat.completions.create(**ask)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [
        tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls
    ]
    assert [(tc.function.name, tc.function.arguments) for tc in streamed] == [("get_weather", call.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_openai_responses_api_streaming_and_not(client):
    reply = client.responses.create(model="qwen", input="Say hi", instructions="Be brief.", max_output_tokens=6,
                                    temperature=0)  # fmt: skip
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output_text and reply.usage.output_tokens == 6
    parts = [{"type": "input_text", "text": "Say hi"}]
    events = list(
        client.responses.create(
            model="qwen",
            input=[{"role": "user", "content": parts}],
            instructions="Be brief.",
            max_output_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply.output_text
    assert events[-1].response.output_text == reply.output_text
    # A function tool round trip: a forced call, then its output goes back in as an item.
    tool = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": WEATHER}
    called = client.responses.create(model="qwen", input="Weather in Paris?", tools=[tool], tool_choice="required",
                                     max_output_tokens=300, temperature=0)  # fmt: skip
    (call,) = [item for item in called.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    follow_up = client.responses.create(model="qwen", tools=[tool], max_output_tokens=5, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "22C and sunny"},
    ])  # fmt: skip
    assert follow_up.status in ("completed", "incomplete") and follow_up.usage.input_tokens > called.usage.input_tokens
    with pytest.raises(openai.BadRequestError, match="does not store responses"):
        client.responses.create(model="qwen", input="Hi", previous_response_id=called.id)
