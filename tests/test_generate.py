"""The decode loop: greedy fidelity, seeded sampling, stop ids / words / strings, batches, bad options."""

import pytest
import torch
from token_ids import random_ids

from qwenlm.generation import SamplingParams, generate, generate_batch, stream
from qwenlm.model import ContextLengthError

GREEDY = {"do_sample": False, "repetition_penalty": 1.0}


def _argmax_recompute(model, ids: list[int], steps: int, vocab: int) -> list[int]:
    seq = list(ids)
    for _ in range(steps):
        logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1, :vocab]
        seq.append(int(logits.argmax()))
    return seq[len(ids) :]


def test_greedy_generate_equals_argmax_over_full_recomputation(tiny_model, qwen_tokenizer):
    ids = qwen_tokenizer.encode("The quick brown fox")
    result = generate(tiny_model, qwen_tokenizer, ids, max_new_tokens=12, eos_token_id=[], **GREEDY)
    assert result.token_ids == _argmax_recompute(tiny_model, ids, 12, len(qwen_tokenizer))
    assert result.finish_reason == "length" and result.prompt_tokens == len(ids)
    assert result.text == qwen_tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_model_generate_samples_per_generation_config_and_seed_reproduces(tiny_model):
    assert tiny_model.generation_config.do_sample  # the checkpoint's chat config samples (top_p 0.8)
    ids = random_ids(1, 5)
    a = tiny_model.generate(ids, max_new_tokens=20, seed=7)
    b = tiny_model.generate(ids, max_new_tokens=20, seed=7)
    others = {tuple(tiny_model.generate(ids, max_new_tokens=20, seed=s)[0].tolist()) for s in range(8, 12)}
    assert a.tolist() == b.tolist()
    assert len(others | {tuple(a[0].tolist())}) > 1  # different seeds do not all agree


def test_torch_manual_seed_makes_model_generate_and_chat_reproducible(tiny_model, qwen_tokenizer):
    """As in transformers: unseeded sampling through model.generate / model.chat follows torch's global RNG."""
    ids = random_ids(1, 5)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        sampled = tiny_model.generate(ids, max_new_tokens=12).tolist()
        runs.append((sampled, tiny_model.chat(qwen_tokenizer, "Hi", max_new_tokens=8)[0]))
    assert runs[0] == runs[1]
    torch.manual_seed(99)
    assert tiny_model.generate(ids, max_new_tokens=12).tolist() != runs[0][0]


def test_model_generate_forces_eos_after_a_stop_word_like_the_reference(tiny_model):
    ids = random_ids(1, 6, seed=1)
    free = tiny_model.generate(ids, max_new_tokens=8, eos_token_id=[], **GREEDY)[0, 6:].tolist()
    stop = free[2]
    assert stop not in free[:2]
    out = tiny_model.generate(ids, max_new_tokens=8, stop_words_ids=[[stop]], eos_token_id=151643, **GREEDY)
    assert out[0, 6:].tolist() == free[:3] + [151643]  # stop token kept, then the forced <|endoftext|>


def test_multi_token_stop_words_and_padding_of_finished_rows(tiny_model):
    ids = random_ids(2, 6, seed=2)
    free = tiny_model.generate(ids, max_new_tokens=8, eos_token_id=[], **GREEDY)[:, 6:].tolist()
    stop_seq = free[0][3:5]
    out = tiny_model.generate(ids, max_new_tokens=8, stop_words_ids=[stop_seq], eos_token_id=151643,
                              pad_token_id=151646, **GREEDY)  # fmt: skip
    row0 = out[0, 6:].tolist()
    assert row0[:6] == free[0][:5] + [151643]
    assert set(row0[6:]) <= {151646}  # finished row padded with pad_token_id while row 1 went on


def test_model_generate_takes_transformers_stopping_criteria_streamers_and_dict_results(tiny_model, qwen_tokenizer):
    """The transformers arguments users pass are honoured or refused, never dropped: a criterion ends rows
    (per row when it returns a tensor), a streamer sees prompt then tokens, a dict result has `.sequences`."""
    from transformers import TextIteratorStreamer

    ids = random_ids(2, 6, seed=3)
    free = tiny_model.generate(ids, max_new_tokens=8, eos_token_id=[], **GREEDY)
    calls = []

    def three_new(input_ids, scores, **kwargs):  # transformers' StoppingCriteria signature
        calls.append(input_ids.shape)
        return input_ids.shape[1] >= 6 + 3

    out = tiny_model.generate(ids, max_new_tokens=8, eos_token_id=[], stopping_criteria=[three_new], **GREEDY)
    assert out.tolist() == free[:, : 6 + 3].tolist() and calls[-1] == (2, 9)

    def row1_after_two(input_ids, scores, **kwargs):  # a bool tensor per row, as newer transformers returns
        return torch.tensor([False, input_ids.shape[1] >= 6 + 2])

    out = tiny_model.generate(ids, max_new_tokens=8, eos_token_id=[], pad_token_id=151646,
                              stopping_criteria=[row1_after_two], **GREEDY)  # fmt: skip
    assert out[0].tolist() == free[0].tolist()
    assert out[1].tolist() == free[1, : 6 + 2].tolist() + [151646] * 6

    result = tiny_model.generate(ids, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True, **GREEDY)
    assert result.sequences.tolist() == result["sequences"].tolist() == free.tolist()
    with pytest.raises(ValueError, match="output_scores=True is not supported"):
        tiny_model.generate(ids, max_new_tokens=2, return_dict_in_generate=True, output_scores=True)

    prompt = qwen_tokenizer.encode("Once upon a time")
    streamer = TextIteratorStreamer(qwen_tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_id=[], streamer=streamer, **GREEDY)
    assert "".join(streamer) == qwen_tokenizer.decode(out[0, len(prompt) :].tolist(), skip_special_tokens=True)
    with pytest.raises(ValueError, match="a streamer takes one sequence"):
        tiny_model.generate(ids, max_new_tokens=2, streamer=TextIteratorStreamer(qwen_tokenizer))


def test_model_generate_with_right_padding_continues_each_prompt(tiny_model, tiny_checkpoint):
    """The tokenizer pads on the right by default: each row still continues its own prompt (transformers would
    generate after the pads), and the result keeps the caller's layout."""
    from qwenlm import AutoTokenizer

    qwen_tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, pad_token="<|endoftext|>")
    prompts = ["hello there my friend how", "a"]
    enc = qwen_tokenizer(prompts, padding=True, return_tensors="pt")
    assert enc["attention_mask"][1, -1] == 0  # right-padded
    out = tiny_model.generate(**enc, max_new_tokens=5, eos_token_id=[], **GREEDY)
    width = enc["input_ids"].shape[1]
    assert out[:, :width].tolist() == enc["input_ids"].tolist()
    for row, prompt in enumerate(prompts):
        alone = tiny_model.generate(torch.tensor([qwen_tokenizer.encode(prompt)]), max_new_tokens=5, eos_token_id=[],
                                    **GREEDY)  # fmt: skip
        assert out[row, width:].tolist() == alone[0, -5:].tolist()


def test_stop_string_spanning_tokens_never_leaks(tiny_model, qwen_tokenizer):
    ids = qwen_tokenizer.encode("Once upon a time")
    full = generate(tiny_model, qwen_tokenizer, ids, max_new_tokens=16, eos_token_id=[], **GREEDY)
    pieces = [qwen_tokenizer.decode([t]) for t in full.token_ids]
    start = next(i for i in range(3, len(pieces) - 2) if pieces[i].strip() and pieces[i + 1].strip())
    stop = (pieces[start] + pieces[start + 1])[1:]  # starts inside one token and ends inside the next
    assert stop and full.text.count(stop) >= 1
    expected = full.text[: full.text.index(stop)]
    chunks = list(stream(tiny_model, qwen_tokenizer, ids, max_new_tokens=16, eos_token_id=[], stop=stop, **GREEDY))
    text = "".join(c.text for c in chunks)
    assert text == expected and chunks[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in chunks)
    assert (
        generate(tiny_model, qwen_tokenizer, ids, max_new_tokens=16, eos_token_id=[], stop=[stop], **GREEDY).text
        == expected
    )


def test_eos_finishes_with_stop_and_is_not_in_the_text(tiny_model, qwen_tokenizer):
    ids = qwen_tokenizer.encode("Hello")
    free = generate(tiny_model, qwen_tokenizer, ids, max_new_tokens=6, eos_token_id=[], **GREEDY)
    eos = free.token_ids[3]
    result = generate(tiny_model, qwen_tokenizer, ids, max_new_tokens=6, eos_token_id=eos, **GREEDY)
    assert result.finish_reason == "stop" and result.token_ids == free.token_ids[:4]


def test_batch_with_left_padding_equals_each_prompt_alone(tiny_model, qwen_tokenizer):
    prompts = ["Hello", "A much longer prompt than the first one, with more tokens", "你好"]
    params = SamplingParams(max_new_tokens=10, **GREEDY)
    batched = generate_batch(tiny_model, qwen_tokenizer, prompts, params)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = generate(tiny_model, qwen_tokenizer, prompt, params)
        assert (result.token_ids, result.text) == (alone.token_ids, alone.text)


def test_stream_text_concatenates_to_the_result_and_stays_in_vocab(tiny_model, qwen_tokenizer):
    chunks = list(stream(tiny_model, qwen_tokenizer, "你好，", max_new_tokens=24, seed=3))
    result = generate(tiny_model, qwen_tokenizer, "你好，", max_new_tokens=24, seed=3)
    assert "".join(c.text for c in chunks) == result.text
    assert all(c.token_id < len(qwen_tokenizer) for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


@pytest.mark.parametrize(
    "option,match",
    [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
     ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_q": 0.5}, "top_q")],
)  # fmt: skip
def test_bad_options_fail_before_any_compute(tiny_model, qwen_tokenizer, option, match, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(tiny_model, "forward", forbidden)
    with pytest.raises(ValueError, match=match):
        stream(tiny_model, qwen_tokenizer, "hi", **option)
    with pytest.raises(ValueError, match=match):
        tiny_model.generate(random_ids(1, 3), **option)


def test_prompt_that_does_not_fit_is_refused_with_the_limits(tiny_model, qwen_tokenizer):
    limit = tiny_model.config.max_context_length
    with pytest.raises(ContextLengthError, match=str(limit)):
        stream(tiny_model, qwen_tokenizer, [100] * (limit - 5), max_new_tokens=10)


def test_greedy_applies_the_configs_repetition_penalty_like_transformers(tiny_model, qwen_tokenizer):
    """do_sample=False still applies repetition_penalty (transformers semantics); penalise hard enough
    and no generated token repeats a prompt token."""
    ids = qwen_tokenizer.encode("a b c d e f g h")
    result = generate(tiny_model, qwen_tokenizer, ids, max_new_tokens=10, do_sample=False,
                      repetition_penalty=1e6, eos_token_id=[])  # fmt: skip
    seen = set(ids)
    for token in result.token_ids:
        assert token not in seen
        seen.add(token)


def test_model_generate_never_samples_the_embedding_padding_rows(tiny_model, monkeypatch):
    """Ids 151851..151935 are embedding padding that no tokenizer can decode: even when they get almost
    all the probability (boosted here), none may come out."""
    forward = tiny_model.forward

    def boosted(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., 151851:] += 50.0
        return out

    monkeypatch.setattr(tiny_model, "forward", boosted)
    out = tiny_model.generate(random_ids(2, 3), max_new_tokens=8, seed=0)
    assert int(out[:, 3:].max()) < 151851
    unguarded = tiny_model.generate(random_ids(2, 3), max_new_tokens=8, seed=0, vocab_limit=None)
    assert int(unguarded[:, 3:].min()) >= 151851  # the boost works: without the guard they dominate
