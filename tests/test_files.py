"""qwenlm.files: the one reader for JSON objects and the one atomic JSON writer the config writers share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenlm.files import read_json_object, write_json_atomic
from qwenlm.finetune.adapters import AdapterError, read_adapter
from qwenlm.quant.config import QuantizationConfig, QuantizationConfigError


def test_read_json_object_names_the_file_and_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 8,', encoding="utf-8")
    with pytest.raises(ValueError, match=r"model config .*config\.json is not valid JSON"):
        read_json_object(bad, "model config")
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        read_json_object(bad, "model config")
    bad.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json_object(bad, "model config")


def test_write_json_atomic_round_trips_unicode(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    write_json_atomic(file, {"name": "通义千问", "n": 1})
    assert file.read_text(encoding="utf-8") == '{\n  "name": "通义千问",\n  "n": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_write_that_fails_halfway_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting a user's config.json (quantize_config's save) must never leave half a file behind."""
    file = tmp_path / "config.json"
    file.write_text('{"model_type": "qwen"}\n', encoding="utf-8")
    real_write = Path.write_text

    def half_then_fail(self: Path, text: str, *args, **kwargs) -> int:
        if "quantization_config" not in text:  # quantize_config.json goes through; config.json's rewrite fails
            return real_write(self, text, *args, **kwargs)
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        QuantizationConfig(bits=4, group_size=128).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert json.loads(file.read_text(encoding="utf-8")) == {"model_type": "qwen"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "quantize_config.json"]


def test_config_readers_report_a_broken_file_by_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(QuantizationConfigError, match=r"config\.json is not valid JSON"):
        QuantizationConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('"lora"', encoding="utf-8")
    with pytest.raises(AdapterError, match=r"adapter config .*adapter_config\.json must hold a JSON object, got str"):
        read_adapter(tmp_path)
