"""Chat: the reference API (`model.chat`, `chat_stream`), batch chat, the messages API, and the seed
documents' snippets run with only the import changed."""

import copy

import pytest
import torch

from qwenlm import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from qwenlm.chat import batch_chat, chat, chat_messages, chat_stream, stream_messages
from qwenlm.chat_format import DEFAULT_SYSTEM, make_context
from qwenlm.testing import make_random_checkpoint

GREEDY = {"do_sample": False, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("base"), preset="tiny", seed=5, chat=False)


def test_chat_returns_response_and_new_history_leaving_input_untouched(tiny_model, qwen_tokenizer):
    history = [("你好", "你好！有什么可以帮你的？")]
    before = copy.deepcopy(history)
    response, new_history = chat(tiny_model, qwen_tokenizer, "讲个故事", history=history, **GREEDY)
    assert history == before
    assert new_history == [*before, ("讲个故事", response)]
    assert response == response.strip()


def test_chat_response_is_the_text_before_the_first_chatml_stop(tiny_model, qwen_tokenizer):
    _, context = make_context(qwen_tokenizer, "Hi", system=DEFAULT_SYSTEM)
    generated = tiny_model.generate(__import__("torch").tensor([context]), eos_token_id=[], stop_words_ids=[],
                                    **GREEDY)[0, len(context) :].tolist()  # fmt: skip
    cut = next((i for i, t in enumerate(generated) if t in (151644, 151645)), len(generated))
    expected = qwen_tokenizer.decode(generated[:cut], skip_special_tokens=True).strip()
    response, _ = chat(tiny_model, qwen_tokenizer, "Hi", eos_token_id=[], **GREEDY)
    assert response == expected


def test_chat_stream_last_yield_equals_chat_response_under_greedy(tiny_model, qwen_tokenizer):
    history = [("Hello", "Hi there")]
    response, _ = chat(tiny_model, qwen_tokenizer, "What now?", history=history, **GREEDY)
    cumulative = list(chat_stream(tiny_model, qwen_tokenizer, "What now?", history=history, **GREEDY))
    deltas = list(chat_stream(tiny_model, qwen_tokenizer, "What now?", history=history, delta=True, **GREEDY))
    assert cumulative[-1] == response
    assert all(b.startswith(a) for a, b in zip(cumulative, cumulative[1:], strict=False))  # each yield extends the last
    assert "".join(deltas) == response


def test_batch_chat_rows_equal_single_chats(tiny_model, qwen_tokenizer):
    queries = ["你好", "Tell me a long story about a dragon", "1+1=?"]
    histories = [None, [("hi", "hello")], None]
    rows = batch_chat(tiny_model, qwen_tokenizer, queries, histories, **GREEDY)
    for query, history, row in zip(queries, histories, rows, strict=True):
        assert row == chat(tiny_model, qwen_tokenizer, query, history=history, **GREEDY)


def test_messages_api_matches_chat(tiny_model, qwen_tokenizer):
    messages = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr"},
        {"role": "user", "content": "Where is the treasure?"},
    ]
    expected, _ = chat(tiny_model, qwen_tokenizer, "Where is the treasure?", history=[("Hello", "Arr")],
                       system="You are a pirate.", **GREEDY)  # fmt: skip
    result = chat_messages(tiny_model, qwen_tokenizer, messages, **GREEDY)
    assert result.text == expected and result.finish_reason in ("stop", "length")
    streamed = "".join(c.text for c in stream_messages(tiny_model, qwen_tokenizer, messages, **GREEDY))
    assert streamed.strip() == expected


def test_user_stop_words_list_is_not_mutated(tiny_model, qwen_tokenizer):
    stops = [[100]]
    chat(tiny_model, qwen_tokenizer, "Hi", stop_words_ids=stops, **GREEDY)
    assert stops == [[100]]


def test_seeded_sampling_reproduces_a_chat(tiny_model, qwen_tokenizer):
    a = chat(tiny_model, qwen_tokenizer, "Hi", max_new_tokens=12, seed=11)[0]
    assert a == chat(tiny_model, qwen_tokenizer, "Hi", max_new_tokens=12, seed=11)[0]


@pytest.mark.parametrize(
    "kwargs,match",
    [({"history": [("only one",)]}, "history"), ({"history": ["not a pair"]}, "history"),
     ({"top_p": 2.0}, "top_p"), ({"bogus": 1}, "bogus"), ({"stream": True}, "chat_stream")],
)  # fmt: skip
def test_chat_bad_input_is_a_clear_error(tiny_model, qwen_tokenizer, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        chat(tiny_model, qwen_tokenizer, "Hi", **kwargs)


def test_chat_on_a_base_model_says_it_is_a_base_model(base_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, progress=False)
    with pytest.raises(ValueError, match="base model"):
        model.chat(tokenizer, "你好", history=None)


# ---- the seed documents' snippets, with only the import changed ----------------------------------
def test_seed_snippet_three_turn_chat(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, device_map="cpu", trust_remote_code=True).eval()
    model.generation_config = GenerationConfig.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model.generation_config.max_new_tokens = 16  # the only change: keep the random model's replies short

    response, history = model.chat(tokenizer, "你好", history=None)
    response, history = model.chat(tokenizer, "给我讲一个年轻人奋斗创业最终取得成功的故事。", history=history)
    response, history = model.chat(tokenizer, "给这个故事起一个标题", history=history)
    assert [q for q, _ in history] == ["你好", "给我讲一个年轻人奋斗创业最终取得成功的故事。", "给这个故事起一个标题"]
    assert history[-1][1] == response


def test_seed_snippet_with_transformers_generation_config_unchanged(tiny_checkpoint):
    """The model cards' line kept as written (transformers' GenerationConfig): chat and generate read it as ours."""
    import transformers

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, device_map="cpu", trust_remote_code=True).eval()
    ours = GenerationConfig.from_pretrained(tiny_checkpoint)
    greedy = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 6}
    expected, _ = model.chat(tokenizer, "你好", history=None, generation_config=ours.updated(**greedy))
    model.generation_config = transformers.GenerationConfig.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model.generation_config.update(**greedy)
    assert model.chat(tokenizer, "你好", history=None)[0] == expected
    ids = torch.tensor([tokenizer.encode("Hello")])
    out = model.generate(ids, generation_config=transformers.GenerationConfig(max_new_tokens=3, do_sample=False))
    assert out.shape == (1, 4)


def test_seed_snippet_system_prompt_role_play(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, device_map="cpu", trust_remote_code=True).eval()
    response, _ = model.chat(tokenizer, "你好呀", history=None, system="请用二次元可爱语气和我说话", max_new_tokens=16)
    system = "You will write beautiful compliments according to needs"
    response, _ = model.chat(tokenizer, "My colleague works diligently", history=None, system=system, max_new_tokens=16)
    assert isinstance(response, str)
    for text in model.chat_stream(tokenizer, "你好", history=None, max_new_tokens=8):
        assert isinstance(text, str)


def test_seed_snippet_base_model_completion(base_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(base_checkpoint, device_map="cpu", trust_remote_code=True).eval()
    inputs = tokenizer("蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是雷克雅未克（Reykjavik）\n埃塞俄比亚的首都是",
                       return_tensors="pt")  # fmt: skip
    inputs = inputs.to(model.device)
    pred = model.generate(**inputs)
    text = tokenizer.decode(pred.cpu()[0], skip_special_tokens=True)
    assert text.startswith(
        "蒙古国的首都是乌兰巴托（Ulaanbaatar）\n冰岛的首都是雷克雅未克（Reykjavik）\n埃塞俄比亚的首都是"
    )
    assert pred.shape[1] <= inputs["input_ids"].shape[1] + 512  # max_new_tokens from generation_config.json
