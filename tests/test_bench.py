"""`qwenlm bench` on the tiny checkpoint: the report's fields, the transformers comparison, presets,
the bandwidth-bound arithmetic, and that the timed decode loop is the real greedy decode."""

from __future__ import annotations

import gc
import inspect
import json
import time

import pytest
import torch

from qwenlm.bench import (
    PRESETS,
    BenchSettings,
    MemoryWindow,
    ReadProbe,
    bound_tokens_per_s,
    bytes_per_decode_step,
    cache_bytes_per_position,
    common_prefix_len,
    engine_peak_mb,
    kv_bytes_per_position,
    mean_decode_context,
    random_prompt,
    resolve_lengths,
    run_bench,
    run_qwenlm,
    weight_bytes_per_token,
)
from qwenlm.cli import main
from qwenlm.generation import generate
from qwenlm.model import load_model

FAST = ["--prompt-len", "8", "--gen-len", "4", "--repeats", "1", "--warmup", "1"]
EOS = 151643


def _bench_json(capsys, *args: str) -> dict:
    main(["bench", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_bench_json_has_every_field_with_sane_values(tiny_checkpoint, capsys):
    threads_before = torch.get_num_threads()
    report = _bench_json(capsys, "--model", str(tiny_checkpoint), *FAST, "--threads", "1", "--dtype", "float32")
    for key in ("model", "shape", "dtype", "quantization", "device", "threads", "batch", "prompt_len", "gen_len",
                "repeats", "load_s", "prefill_tok_s", "ttft_s", "decode_tok_s", "peak_rss_mb", "vmhwm_mb",
                "weight_bytes_per_token", "bandwidth_gbps", "bound_tok_s", "fraction_of_bound", "versions",
                "machine", "date", "engines"):  # fmt: skip
        assert key in report, key
    assert report["shape"] == {"layers": 2, "hidden": 64, "heads": 4, "mlp_width": 128, "vocab": 151936,
                               "seq_length": 256}  # fmt: skip
    assert (report["dtype"], report["quantization"], report["device"]) == ("float32", "none", "cpu")
    assert (report["threads"], report["batch"], report["prompt_len"], report["gen_len"]) == (1, 1, 8, 4)
    assert torch.get_num_threads() == threads_before  # the bench restores the thread count
    assert report["load_s"] > 0 and report["ttft_s"] > 0
    assert report["prefill_tok_s"] == pytest.approx(8 / report["ttft_s"])
    assert report["decode_tok_s"] == pytest.approx(3 / report["decode_s"])
    assert report["bandwidth_gbps"] > 0.1 and report["bandwidth_source"] == "measured"
    assert report["bound_tok_s"] == pytest.approx(report["bandwidth_gbps"] * 1e9 / report["bytes_per_step"])
    assert 0 < report["fraction_of_bound"] < 2
    assert report["fraction_of_bound"] == pytest.approx(report["decode_tok_s"] / report["bound_tok_s"])
    assert report["peak_rss_mb"] >= 0 and report["vmhwm_mb"] > 100  # torch alone is > 100 MiB
    assert report["versions"]["torch"] == torch.__version__
    assert report["machine"]["cores"] >= 1 and report["date"][:2] == "20"
    assert list(report["engines"]) == ["qwenlm"] and "ratios" not in report
    assert len(report["engines"]["qwenlm"]["samples"]["ttft_s"]) == 1


def test_decode_above_a_bound_is_explained_not_silent(tiny_checkpoint, capsys):
    """--bandwidth far too low puts decode above the bound: the table says why rather than printing 1000%."""
    main(["bench", "--model", str(tiny_checkpoint), *FAST, "--bandwidth", "0.001"])
    out = capsys.readouterr().out
    assert "note: decode ran above the bound" in out
    main(["bench", "--model", str(tiny_checkpoint), *FAST, "--bandwidth", "1e9"])
    assert "above the bound" not in capsys.readouterr().out


def test_bench_compare_transformers_runs_both_engines(tiny_checkpoint, capsys, tmp_path):
    out = tmp_path / "bench.json"
    main(["bench", "--model", str(tiny_checkpoint), *FAST, "--dtype", "float32", "--bandwidth", "20",
          "--compare", "transformers", "--output", str(out)])  # fmt: skip
    table = capsys.readouterr().out
    assert "qwenlm / transformers: prefill" in table
    assert [line.split()[0] for line in table.splitlines()[4:6]] == ["qwenlm", "transformers"]
    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"qwenlm", "transformers"}
    theirs = report["engines"]["transformers"]
    assert theirs["decode_tok_s"] > 0 and theirs["prefill_tok_s"] > 0 and theirs["peak_rss_mb"] >= 0
    assert report["ratios"]["decode"] == pytest.approx(report["decode_tok_s"] / theirs["decode_tok_s"])
    assert report["ratios"]["prefill"] == pytest.approx(report["prefill_tok_s"] / theirs["prefill_tok_s"])
    # fp32, prompt within seq_length: the same weights give the same greedy tokens in both engines
    assert report["greedy_tokens_agree"] == 4
    assert report["bandwidth_source"] == "given" and report["bandwidth_gbps"] == 20


def test_bench_presets_set_the_lengths(tiny_checkpoint, capsys):
    assert resolve_lengths(None, None, "profile-2048") == (1, 2048)
    assert resolve_lengths(None, None, "profile-8192") == (1, 8192)
    assert resolve_lengths(None, None, "encode-2048") == (2048, 1)
    assert resolve_lengths(None, None, None) == (512, 128)
    assert resolve_lengths(None, 7, "profile-2048") == (1, 7)  # an explicit length wins
    assert set(PRESETS) == {"profile-2048", "profile-8192", "encode-2048"}
    report = _bench_json(capsys, "--model", str(tiny_checkpoint), "--preset", "encode-2048", "--repeats", "1",
                         "--warmup", "0", "--bandwidth", "20")  # fmt: skip
    assert (report["preset"], report["prompt_len"], report["gen_len"]) == ("encode-2048", 2048, 1)
    assert report["decode_tok_s"] is None and report["fraction_of_bound"] is None  # one token: no decode
    assert report["prefill_tok_s"] == pytest.approx(2048 / report["ttft_s"])


def test_bound_arithmetic_on_a_hand_computed_example():
    assert kv_bytes_per_position(num_layers=24, hidden_size=2048, element_size=2) == 2 * 24 * 2048 * 2
    assert mean_decode_context(prompt_len=100, gen_len=21) == 110.5  # steps read 101 .. 120 keys
    step = bytes_per_decode_step(weight_bytes=10**9, kv_bytes_per_pos=1000, batch=2, prompt_len=100, gen_len=21)
    assert step == 10**9 + 2 * 1000 * 110.5
    assert bound_tokens_per_s(step, bandwidth_gbps=20.0, batch=2) == pytest.approx(2 * 20e9 / 1_000_221_000)
    assert bound_tokens_per_s(2e9, bandwidth_gbps=20.0, batch=1) == pytest.approx(10.0)


def test_weight_and_cache_bytes_count_what_a_decode_step_reads(tiny_model):
    c = tiny_model.config
    h, f, v, n = c.hidden_size, c.mlp_width, c.vocab_size, c.num_hidden_layers
    per_layer = (3 * h * h + 3 * h) + h * h + 3 * h * f + 2 * h  # c_attn (+bias), c_proj, w1/w2/c_proj, 2 norms
    assert weight_bytes_per_token(tiny_model) == 4 * (n * per_layer + h + v * h)  # + ln_f + lm_head, fp32
    # the cache the decode loop allocates holds K and V of every layer, fp32 like the model
    assert cache_bytes_per_position(tiny_model) == kv_bytes_per_position(n, h, element_size=4)


def _argmax_by_recompute(model, ids: torch.Tensor, n: int) -> list[list[int]]:
    """Greedy tokens from full forwards without a cache: an independent check of the decode loop."""
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, use_cache=False).logits[:, -1, :151851]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, -n:].tolist()


def test_bench_decode_is_the_real_greedy_decode(tiny_model, tiny_checkpoint):
    from qwenlm import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = random_prompt(2, 9, seed=3)
    timing = run_qwenlm(tiny_model, ids, 6)
    assert timing.ttft_s > 0 and timing.decode_s > 0
    for row in range(2):
        expected = generate(tiny_model, tokenizer, ids[row].tolist(), do_sample=False, max_new_tokens=6,
                            repetition_penalty=1.0, eos_token_id=[], stop_words_ids=[]).token_ids  # fmt: skip
        assert timing.token_ids[row] == expected
    assert timing.token_ids == _argmax_by_recompute(tiny_model, ids, 6)


def test_bench_decode_ignores_eos(tiny_checkpoint):
    model = load_model(tiny_checkpoint, torch_dtype=torch.float32, progress=False)

    def eos_always_wins(module, inputs, logits):
        logits[..., EOS] += 1e4
        return logits

    model.lm_head.register_forward_hook(eos_always_wins)
    ids = random_prompt(1, 5, seed=1)
    assert run_qwenlm(model, ids, 5).token_ids == [[EOS] * 5]  # exactly gen_len tokens, eos or not
    from qwenlm import AutoTokenizer

    # what a user's generate does with the checkpoint's eos: stops at once (so the bench must not)
    result = generate(model, AutoTokenizer.from_pretrained(tiny_checkpoint), ids[0].tolist(), do_sample=False)
    assert result.token_ids == [EOS] and result.finish_reason == "stop"


def test_bench_settings_reject_bad_values():
    with pytest.raises(ValueError, match="quantization"):
        BenchSettings(quantization="int3")
    with pytest.raises(ValueError, match="gen_len"):
        BenchSettings(gen_len=0)
    with pytest.raises(ValueError, match="preset"):
        resolve_lengths(None, None, "profile-9999")


def test_bench_quantization_is_passed_to_load_model(tiny_checkpoint):
    settings = BenchSettings(model=str(tiny_checkpoint), quantization="int8", prompt_len=8, gen_len=3, repeats=1,
                             warmup=0, bandwidth_gbps=20.0, compare="transformers")  # fmt: skip
    if "quantization" not in inspect.signature(load_model).parameters:
        with pytest.raises(ValueError, match="no quantization= option"):  # never silently unquantized
            run_bench(settings)
        return
    report = run_bench(settings)
    assert report["quantization"] == "int8" and report["decode_tok_s"] > 0
    assert list(report["engines"]) == ["qwenlm"] and "transformers skipped" in report["notes"][0]


def test_memory_window_sees_a_transient_allocation():
    # Garbage from earlier tests, collected mid-window, would lower RSS under the block: collect it first
    # and keep the collector off while measuring (this test ran flaky after other files without that).
    gc.collect()
    gc.disable()
    try:
        with MemoryWindow() as window:
            block = torch.ones(128 * 2**20 // 4)  # 128 MiB, touched
            time.sleep(0.1)  # the poller samples every few ms: let it see the block before it goes
            del block
    finally:
        gc.enable()
    assert window.peak_delta_mb > 96
    assert window.resident_delta_mb < window.peak_delta_mb


def test_engine_peak_is_resident_load_plus_largest_run_transient():
    def window(baseline: float, peak: float, end: float) -> MemoryWindow:
        w = MemoryWindow()
        w.baseline_mb, w.peak_mb, w.end_mb = baseline, peak, end
        return w

    load = window(100, 400, 300)  # load peaked at +300, left +200 resident
    runs = [window(900, 950, 900), window(500, 620, 510)]  # transients +50, +120 (baselines differ: interleaving)
    assert engine_peak_mb(load, runs) == 320
    assert engine_peak_mb(window(100, 900, 200), runs) == 800  # a load spike higher than any run


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 5, 6]]) == 2
    assert common_prefix_len([[1, 2]], [[1, 2]]) == 2


def test_bench_skips_transformers_for_a_config_qwen2_cannot_express(tmp_path):
    from qwenlm.testing import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path / "partial-rotary", preset="tiny", rotary_pct=0.5)
    settings = BenchSettings(model=str(folder), prompt_len=4, gen_len=2, repeats=1, warmup=0, bandwidth_gbps=20.0,
                             compare="transformers")  # fmt: skip
    report = run_bench(settings)
    assert list(report["engines"]) == ["qwenlm"] and "ratios" not in report
    assert "transformers skipped" in report["notes"][0] and "rotary" in report["notes"][0]


def test_read_probe_reads_each_slice_of_its_buffer_in_turn():
    """The probe between decode steps: the slices split the buffer into disjoint whole rows, calls cycle through
    them (so a slice is cold again by its turn), and the kernel is the fastest of the named reads."""
    probe = ReadProbe(size_mb=8, slices=4)
    assert probe.kernel in {"sum", "int32 amax", "bf16 sum", "linear"}
    assert probe.slice_bytes == 2 * 2**20 and probe.buffer.nbytes == 4 * probe.slice_bytes
    starts = [part.data_ptr() for part in probe.parts]
    assert starts == [probe.buffer.data_ptr() + i * probe.slice_bytes for i in range(4)]
    assert all(part.nbytes == probe.slice_bytes and part.numel() % 4096 == 0 for part in probe.parts)
    assert [probe._next for _ in range(5) if probe.read_gbps() > 0] == [1, 2, 3, 0, 1]
