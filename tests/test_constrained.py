"""Grammar-constrained decoding (generation.constrained) on the real Qwen vocabulary: the mask admits
exactly the continuations the schema allows, a finished grammar leaves only the end tokens, decoding
from arbitrary logits always yields valid JSON, and bad schemas fail with a clear message."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
import torch

from qwenlm.generation.constrained import (
    JSON_STYLE,
    GrammarCompiler,
    GrammarError,
    GrammarUnavailable,
    json_schema_grammar,
    json_value_rule,
)

END = [151643, 151644, 151645]  # <|endoftext|>, <|im_start|>, <|im_end|>
VOCAB = 151851
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(qwen_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(qwen_tokenizer, END)


def _decode(constraint, logits_for_step, limit: int = 200) -> list[int]:
    out = []
    for step in range(limit):
        token = int(constraint.mask_logits(logits_for_step(step)).argmax())
        if token in END:
            return out
        constraint.advance(token)
        out.append(token)
    raise AssertionError("the grammar did not finish")


def test_the_mask_follows_a_valid_json_text_token_by_token(compiler, qwen_tokenizer):
    constraint = compiler.compile(json_schema_grammar(SCHEMA))
    text = json.dumps({"city": "Paris", "unit": "c", "days": [1, 2]})  # json.dumps' layout = JSON_STYLE's
    for token in qwen_tokenizer.encode(text):
        assert constraint.allowed(VOCAB)[token], qwen_tokenizer.decode([token])
        constraint.advance(token)
    allowed = constraint.allowed(VOCAB)
    assert constraint.finished and allowed.nonzero().flatten().tolist() == END  # only an end token may follow


def test_forbidden_tokens_get_minus_inf(compiler, qwen_tokenizer):
    constraint = compiler.compile(json_schema_grammar(SCHEMA))
    logits = torch.zeros(1, VOCAB)
    masked = constraint.mask_logits(logits)
    assert masked[0, qwen_tokenizer.encode('{"city"')[0]] == 0  # the forced start, tokenized canonically
    for text in ("[", "hello", " {"):  # no array, no prose, no leading blank (fixed layout)
        assert masked[0, qwen_tokenizer.encode(text)[0]] == float("-inf")
    assert all(masked[0, t] == float("-inf") for t in END)  # cannot stop before the object is complete


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_logits_decode_to_json_that_validates(compiler, qwen_tokenizer, seed):
    generator = torch.Generator().manual_seed(seed)
    constraint = compiler.compile(json_schema_grammar(SCHEMA))
    tokens = _decode(constraint, lambda _: torch.randn(1, VOCAB, generator=generator))
    value = json.loads(qwen_tokenizer.decode(tokens))
    jsonschema.validate(value, SCHEMA)


def test_json_object_mode_and_the_layout(compiler, qwen_tokenizer):
    constraint = compiler.compile(json_schema_grammar(None))  # json_object: any object
    forced = qwen_tokenizer.encode('{"a": [1, 2], "b": {"c": null}}')
    tokens = _decode(constraint, lambda step: torch.nn.functional.one_hot(torch.tensor([forced[step]]), VOCAB) * 50.0
                     if step < len(forced) else torch.zeros(1, VOCAB))  # fmt: skip
    assert qwen_tokenizer.decode(tokens) == '{"a": [1, 2], "b": {"c": null}}'
    assert json.loads(json_value_rule({"type": "object"}).removeprefix("%json "))["x-guidance"] == {
        **JSON_STYLE, "lenient": False
    }  # fmt: skip


def test_strict_schemas_refuse_what_cannot_be_enforced_and_lenient_ones_ignore_it(compiler):
    schema = {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}
    with pytest.raises(GrammarError, match="Unimplemented keys.*dependentSchemas"):
        compiler.compile(json_schema_grammar(schema))
    assert compiler.compile(json_schema_grammar(schema, lenient=True)) is not None


@pytest.mark.parametrize(
    "grammar, message",
    [(json_schema_grammar({"type": "strin"}), "Invalid type: strin"), ("start: nowhere", 'unknown name: "nowhere"')],
)
def test_bad_grammars_fail_with_a_one_line_reason(compiler, grammar, message):
    with pytest.raises(GrammarError) as info:
        compiler.compile(grammar)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(GrammarError, match="must be an object"):
        json_value_rule(["not", "a", "schema"])


def test_a_token_the_grammar_refuses_leaves_only_the_end_tokens(compiler, qwen_tokenizer):
    constraint = compiler.compile(json_schema_grammar(SCHEMA))
    constraint.advance(qwen_tokenizer.encode("[")[0])  # only possible if something else chose it
    assert constraint.error and constraint.allowed(VOCAB).nonzero().flatten().tolist() == END


def test_missing_llguidance_is_a_clear_error(qwen_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(GrammarUnavailable, match="pip install llguidance"):
        GrammarCompiler(qwen_tokenizer, END)
