"""The `qwenlm` command, run in-process on real checkpoint folders."""

import io
import json

import pytest
import torch

from qwenlm import AutoTokenizer
from qwenlm.cli import DEMO_NOTICE, main


def test_generate_streams_the_greedy_continuation(tiny_checkpoint, tiny_model, capsys):
    main(["generate", "--model", str(tiny_checkpoint), "--cpu-only", "--dtype", "float32", "--greedy",
          "--max-new-tokens", "6", "你好，世界"])  # fmt: skip
    out, err = capsys.readouterr()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tokenizer.encode("你好，世界")
    expected = tiny_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :]
    assert out == "你好，世界" + tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert "tokens/s" in err and "finish:" in err


def test_generate_sampling_flags_and_stop_strings(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "12", "--temperature", "0.8",
            "--top-p", "0.9", "--top-k", "20", "--seed", "3", "Once"]  # fmt: skip
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first  # --seed makes sampling reproducible
    stop = first[len("Once") :].strip()[:3]
    main([*args, "--stop", stop])
    out = capsys.readouterr().out
    assert stop not in out[len("Once") :]


def test_chat_command_runs_scripted_queries(tiny_checkpoint, capsys):
    main(["chat", "--model", str(tiny_checkpoint), "--greedy", "--max-new-tokens", "5", "-q", "你好", "-q", "再见"])
    out = capsys.readouterr().out
    assert out.count("Qwen: ") == 2 and "User> 你好" in out and "\x1b[" not in out


def test_chat_rejects_bad_sampling_flags_at_start_up(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit, match="temperature"):
        main(["chat", "--model", str(tiny_checkpoint), "--temperature", "-1", "-q", "hi"])
    assert "Qwen: " not in capsys.readouterr().out  # refused before the first turn, not once per reply


def test_generate_reads_the_prompt_from_stdin(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    main(["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "-"])
    assert capsys.readouterr().out.startswith("from stdin")


def test_generate_without_model_uses_the_demo_checkpoint_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWENLM_CACHE", str(tmp_path))
    main(["generate", "--max-new-tokens", "3", "Hi"])
    out, err = capsys.readouterr()
    assert DEMO_NOTICE in err and "RANDOM" in err and "making the demo checkpoint" in err
    assert out.startswith("Hi")
    demo = next(tmp_path.glob("demo-tiny-v*"))
    assert json.loads((demo / "config.json").read_text())["model_type"] == "qwen"
    main(["generate", "--max-new-tokens", "3", "Hi"])  # second run reuses it
    assert "making the demo checkpoint" not in capsys.readouterr().err


def test_generate_rejects_bad_input(tiny_checkpoint):
    with pytest.raises(SystemExit, match="empty"):
        main(["generate", "--model", str(tiny_checkpoint), ""])
    with pytest.raises(SystemExit, match="top_p"):
        main(["generate", "--model", str(tiny_checkpoint), "--top-p", "1.5", "x"])
    with pytest.raises(SystemExit, match="max_new_tokens"):
        main(["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "0", "x"])
    with pytest.raises(SystemExit, match="error: .*/nonexistent/qwen"):
        main(["generate", "--model", "/nonexistent/qwen", "x"])


def test_make_checkpoint_command(tmp_path, capsys):
    main(["make-checkpoint", str(tmp_path / "c"), "--preset", "tiny", "--base", "--set", "seq_length=32"])
    assert "wrote a random tiny checkpoint" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "config.json").read_text())["seq_length"] == 32
    assert json.loads((tmp_path / "c" / "generation_config.json").read_text())["chat_format"] == "raw"
    with pytest.raises(SystemExit, match="is not empty .* pass --overwrite"):
        main(["make-checkpoint", "--preset", "tiny", str(tmp_path / "c")])  # options before the folder work too
    main(["make-checkpoint", "--max-shard-size", "100KB", "--overwrite", str(tmp_path / "c")])
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()
    main(["make-checkpoint", "--overwrite", str(tmp_path / "c")])  # one file again: no shard of the last one stays
    assert sorted(p.name for p in (tmp_path / "c").glob("model*")) == ["model.safetensors"]
    for bad, message in [(["--set", "foo=1"], "'foo' is not a config.json field"),
                         (["--set", "rotary_pct=abc"], "'rotary_pct' must be float, got 'abc'"),
                         (["--set", "seq_length"], "expected KEY=VALUE"),
                         (["--max-shard-size", "10XB"], "size '10XB' is not a number of bytes")]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            main(["make-checkpoint", str(tmp_path / "d"), *bad])


def test_command_mistakes_are_one_line_and_signals_end_commands_cleanly(tiny_checkpoint, tmp_path):
    """OS errors (a path under a file, a folder given for a file) are one line; flags that would be ignored are
    refused; SIGTERM ends a command as Ctrl-C does; a reader that leaves a pipe early is not an error."""
    import signal
    import subprocess
    import sys

    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, message in [
        (["make-checkpoint", str(afile / "sub")], "error: .*afile/sub"),
        (["bench", "--model", str(tiny_checkpoint), "--output", str(tmp_path)], "give a file name"),
        (["quantize", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "q"), "--bits", "8",
          "--method", "rtn", "--desc-act"], "for --method gptq"),
        (["merge-lora", "--adapter", str(tmp_path), "--output", str(tmp_path / "m"), "--bits", "8"],
         "only apply with --requantize"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            main(argv)

    cmd = [sys.executable, "-m", "qwenlm", "generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "2000",
           "--greedy", "Once upon a time"]  # fmt: skip
    piped = subprocess.run(f"{subprocess.list2cmdline(cmd)} | head -c 20", shell=True, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert "Traceback" not in piped.stderr and piped.stdout.startswith("Once upon a time")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.read(20).startswith("Once upon a time")  # generating now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err


def test_make_checkpoint_replaces_a_folder_whole(tmp_path, capsys):
    folder = tmp_path / "c"
    main(["make-checkpoint", "--set", "seq_length=32", "--set", "rotary_pct=0.5", str(folder)])  # --set repeats
    assert "with seq_length=32, rotary_pct=0.5" in capsys.readouterr().out
    (folder / "adapter_config.json").write_text("{}")  # what another tool left there
    main(["make-checkpoint", "--overwrite", str(folder)])
    assert not (folder / "adapter_config.json").exists() and json.loads((folder / "config.json").read_text())[
        "seq_length"] != 32  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no partial or old folder left beside it
    assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable as any file (umask 022)
