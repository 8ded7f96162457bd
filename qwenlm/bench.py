"""`qwenlm bench`: load time, prefill and decode speed, peak memory and the memory-bandwidth bound of
decoding, for qwenlm and (optionally) transformers' Qwen2 on the same weights, in one process.

    report = run_bench(BenchSettings(model="Qwen-1_8B", dtype="bfloat16", compare="transformers"))
    print(format_report(report))
    qwenlm bench --model Qwen-1_8B --dtype bfloat16 --prompt-len 512 --gen-len 128 --compare transformers --json

What is timed (identically for every repeat):
- qwenlm: `generation.generate_steps`, the decode loop `generate`/`stream` run (same forward, KV cache
  and argmax), greedy, with no eos or stop words so that exactly `gen_len` tokens come out; its static,
  torch.compile'd loop on CUDA or with `compile=True` (`--compile`), else the eager one.
  TTFT = until the first token is sampled (prefill); decode = from there to the last token.
- transformers: one `generate(do_sample=False, min_new_tokens=max_new_tokens=gen_len)` call with its
  own cache; TTFT = until its streamer receives the first new token, decode = the rest of the call.
Engines run interleaved (q, t, q, t, ...) after warm-up rounds; rates use the median run (and the best).
With the compiled loop, qwenlm's warm-up rounds have the measured shapes, so compiling (and capturing
CUDA graphs) happens there, never in a measured run.
Decode tok/s = batch * (gen_len - 1) / decode time; prefill tok/s = batch * prompt_len / TTFT.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import kernels as qwenlm_kernels
from .files import write_text_atomic
from .model import huge_pages
from .quant.config import checkpoint_quantization

__all__ = [
    "PRESETS", "BenchSettings", "MemoryWindow", "RunTiming", "bound_tokens_per_s", "bytes_per_decode_step",
    "cache_bytes_per_position", "common_prefix_len", "compute_dtype", "engine_peak_mb", "format_report",
    "kv_bytes_per_position", "load_qwenlm", "load_transformers", "mean_decode_context", "measure_bandwidth_gbps",
    "random_prompt", "resolve_lengths", "run_bench", "run_qwenlm", "run_transformers", "summarize_engine",
    "weight_bytes_per_token", "write_report",
]  # fmt: skip

# Preset lengths of the Qwen README profiling (spec 10.1): (prompt tokens, generated tokens).
PRESETS: dict[str, tuple[int, int]] = {
    "profile-2048": (1, 2048),  # generate 2048 tokens from a 1-token context
    "profile-8192": (1, 8192),  # generate 8192 tokens from a 1-token context
    "encode-2048": (2048, 1),  # encode 2048 tokens of context, generate one (peak memory)
}
DEFAULT_PROMPT_LEN = 512
DEFAULT_GEN_LEN = 128
QUANTIZATIONS = ("none", "int8", "int4")
REGULAR_TOKENS = 151643  # ids below this are ordinary BPE tokens (151643 is <|endoftext|>)
BANDWIDTH_BUFFER_MB = 512  # well past any CPU cache, small enough for a shared box
WARMUP_PROMPT_LEN = 16  # warm-up runs are short: they page the weights in and start the thread pools
WARMUP_GEN_LEN = 2
MEASURED = {
    "qwenlm": "generation.generate_steps (the loop generate/stream use): greedy, eos and stop words off; "
    "TTFT = until the first token is sampled",
    "qwenlm-compiled": "generation.generate_steps with the static torch.compile'd decode step (CUDA graphs on "
    "CUDA; the loop generate/stream use on CUDA): greedy, eos and stop words off; TTFT = until the first token "
    "is sampled",
    "transformers": "Qwen2ForCausalLM.generate(do_sample=False, min_new_tokens=max_new_tokens=gen_len), own cache; "
    "TTFT = until its streamer gets the first new token",
}


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSettings:
    """What to benchmark and how; validated once. `model=None` means the demo checkpoint."""

    model: str | None = None
    dtype: str = "auto"
    """auto (the loader's choice: fp32 on CPU, bf16 on CUDA), float32, bfloat16 or float16."""
    quantization: str = "none"
    """Passed to `load_model(quantization=...)` unless "none"."""
    prompt_len: int = DEFAULT_PROMPT_LEN
    gen_len: int = DEFAULT_GEN_LEN
    batch: int = 1
    threads: int | None = None
    """torch CPU threads for the whole bench (None: torch's default)."""
    device: str = "cpu"
    repeats: int = 3
    warmup: int = 1
    """Warm-up rounds (short runs per engine, not measured)."""
    compare: str | None = None
    """"transformers" to run transformers' Qwen2ForCausalLM beside qwenlm."""
    preset: str | None = None
    bandwidth_gbps: float | None = None
    """Memory bandwidth to use for the bound; None measures it."""
    seed: int = 0
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """config.json fields to change for qwenlm (e.g. seq_length), as `load_model` accepts them."""
    compile: bool | None = None
    """qwenlm's decode loop: True the static compiled one, False the eager one, None generate_steps' choice
    (compiled on CUDA, eager on the CPU, unless QWENLM_COMPILE says otherwise)."""

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "batch", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"bench setting {name!r} must be an int >= 1, got {value!r}")
        if self.warmup < 0:
            raise ValueError(f"bench setting 'warmup' must be >= 0, got {self.warmup!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"bench setting 'threads' must be >= 1, got {self.threads!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"bench setting 'dtype' must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"bench setting 'quantization' must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"bench setting 'device' must be cpu or cuda, got {self.device!r}")
        if self.compare not in (None, "transformers"):
            raise ValueError(f"bench setting 'compare' must be None or 'transformers', got {self.compare!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        if self.bandwidth_gbps is not None and not 0 < self.bandwidth_gbps < float("inf"):
            raise ValueError(f"bench setting 'bandwidth_gbps' must be > 0, got {self.bandwidth_gbps!r}")


def resolve_lengths(prompt_len: int | None, gen_len: int | None, preset: str | None) -> tuple[int, int]:
    """(prompt_len, gen_len): an explicit length wins, then the preset's, then the defaults."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    preset_prompt, preset_gen = PRESETS[preset] if preset else (DEFAULT_PROMPT_LEN, DEFAULT_GEN_LEN)
    return (prompt_len if prompt_len is not None else preset_prompt, gen_len if gen_len is not None else preset_gen)


# --------------------------------------------------------------------------------------------------
# The bandwidth bound (pure arithmetic)
# --------------------------------------------------------------------------------------------------
def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every tensor of the state dict (linears incl. lm_head,
    quantization scales, norms, biases) except the embedding table, of which a step reads one row."""
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
               if not name.startswith("transformer.wte."))  # fmt: skip


def kv_bytes_per_position(num_layers: int, hidden_size: int, element_size: int) -> int:
    """Bytes of cached keys + values per token position of one sequence (all layers)."""
    return 2 * num_layers * hidden_size * element_size


def cache_bytes_per_position(model: torch.nn.Module) -> float:
    """Bytes per token position of the KV cache the decode loop really allocates for `model` (batch 1):
    `kv_bytes_per_position` for a float cache, less for an int8 one (codes + scales)."""
    from .model.kv_cache import KVCache

    cache = KVCache.for_model(model, batch_size=1, capacity=1)
    return cache.nbytes() / cache.capacity


def mean_decode_context(prompt_len: int, gen_len: int) -> float:
    """Mean number of cached positions a decode step reads: the step that makes token n (n = 2..gen_len)
    attends over prompt_len + n - 1 keys, which averages prompt_len + gen_len / 2."""
    return prompt_len + gen_len / 2


def bytes_per_decode_step(weight_bytes: int, kv_bytes_per_pos: float, batch: int, prompt_len: int,
                          gen_len: int) -> float:  # fmt: skip
    """Weights once (shared by the batch) plus every row's KV cache at the mean context."""
    return weight_bytes + batch * kv_bytes_per_pos * mean_decode_context(prompt_len, gen_len)


def bound_tokens_per_s(bytes_per_step: float, bandwidth_gbps: float, batch: int) -> float:
    """Decode tokens/s if a step cost only its memory reads: batch tokens per bytes_per_step read.
    GB/s here is 1e9 bytes/s."""
    return batch * bandwidth_gbps * 1e9 / bytes_per_step


def measure_bandwidth_gbps(device: str = "cpu", size_mb: int = BANDWIDTH_BUFFER_MB, repeats: int = 3) -> float:
    """Achievable memory bandwidth, GB/s (1e9 bytes/s), with the current torch thread count.

    CPU: the fastest of a few read-only reductions over a buffer far larger than any cache (decoding
    mostly reads), on huge pages where the OS gives them, as loaded weights are (model/huge_pages.py).
    CUDA: a device-to-device copy (read + write bytes). Best of `repeats` each.
    """
    numel = size_mb * 2**20 // 4
    if device == "cuda":
        src = torch.ones(numel, device="cuda")
        dst = torch.empty_like(src)
        kernels = [(lambda: dst.copy_(src), 2 * src.nbytes)]
    else:
        src = huge_pages.empty((numel,), torch.float32).fill_(1.0)  # as the loader places weights
        kernels = [(kernel, src.nbytes) for kernel in _read_kernels(src).values()]
    best = 0.0
    for kernel, nbytes in kernels:
        kernel()  # first touch / kernel selection
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            kernel()
            _sync(device)
            best = max(best, nbytes / (time.perf_counter() - start) / 1e9)
    return best


def _read_kernels(buffer: Tensor) -> dict[str, Callable[[], Any]]:
    """Read-only passes over a float32 buffer: the reductions of `measure_bandwidth_gbps` and a matrix-vector
    product (a pure weight stream, as a decode step's linears are)."""
    matrix, row = buffer.view(-1, 4096), torch.ones(1, 4096)
    return {"sum": buffer.sum, "int32 amax": buffer.view(torch.int32).amax,
            "bf16 sum": buffer.view(torch.bfloat16).sum,
            "linear": lambda: qwenlm_kernels.linear(row, matrix)}  # fmt: skip


class ReadProbe:
    """CPU read bandwidth sampled *between* the steps it bounds, for hosts whose bandwidth drifts.

    A probe taken once per round and a decode timed seconds later can fall in different phases of a shared
    host (fractions of 0.45-1.48 in one case were seen here). This probe reads one slice of a buffer far past
    the caches per call (each slice is cold again by its next turn), so it can run after every decode step
    and pair each step with the bandwidth of the moment. The kernel is the fastest of `_read_kernels` over the
    whole buffer at construction; every later call uses that one.
    """

    def __init__(self, size_mb: int = 2048, slices: int = 4) -> None:
        numel = size_mb * 2**20 // 4 // (slices * 4096) * 4096  # whole rows of 4096 per slice
        self.buffer = huge_pages.empty((numel * slices,), torch.float32).fill_(1.0)
        self.parts = self.buffer.split(numel)
        self.slices = [_read_kernels(part) for part in self.parts]
        whole = _read_kernels(self.buffer)
        speeds = {}
        for name, kernel in whole.items():
            kernel()  # kernel selection / first touch
            start = time.perf_counter()
            kernel()
            speeds[name] = time.perf_counter() - start
        self.kernel = min(speeds, key=speeds.__getitem__)
        self.slice_bytes = numel * 4
        self._next = 0

    def read_gbps(self) -> float:
        """GB/s (1e9 bytes/s) of one read of the next slice."""
        kernel = self.slices[self._next][self.kernel]
        self._next = (self._next + 1) % len(self.slices)
        start = time.perf_counter()
        kernel()
        return self.slice_bytes / (time.perf_counter() - start) / 1e9


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident set size of this process now, MiB (Linux /proc/self/statm: cheap enough to poll)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vmhwm_mb() -> float:
    """Peak resident set size of this process since it started (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class MemoryWindow:
    """Peak memory while a block runs, relative to its start.

    CPU: RSS polled by a background thread (plus a sample at each end); CUDA: the allocator's peak.
    After the block: `baseline_mb`, `peak_mb`, `end_mb`.
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.baseline_mb = self.peak_mb = self.end_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __enter__(self) -> MemoryWindow:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = self.peak_mb = torch.cuda.memory_allocated() / 2**20
            return self
        self.baseline_mb = self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            self.end_mb = torch.cuda.memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.end_mb = rss_mb()
        self.peak_mb = max(self.peak_mb, self.end_mb)

    @property
    def peak_delta_mb(self) -> float:
        return self.peak_mb - self.baseline_mb

    @property
    def resident_delta_mb(self) -> float:
        return self.end_mb - self.baseline_mb


def engine_peak_mb(load: MemoryWindow, runs: list[MemoryWindow]) -> float:
    """An engine's own peak over its pre-load baseline: what its load left resident plus its largest
    transient during a run, or the load's own peak if that was higher. Windows of other engines
    (interleaved runs) never count."""
    run_peak = max((w.peak_delta_mb for w in runs), default=0.0)
    return max(load.peak_delta_mb, load.resident_delta_mb + run_peak)


# --------------------------------------------------------------------------------------------------
# Engines: load + one timed run each
# --------------------------------------------------------------------------------------------------
@dataclass
class RunTiming:
    """One timed generation: seconds to the first token, seconds in all, and the tokens per row."""

    ttft_s: float
    total_s: float
    token_ids: list[list[int]]

    @property
    def decode_s(self) -> float:
        return self.total_s - self.ttft_s


def _sync(device: str | torch.device) -> None:
    """Wait for queued GPU work so a timer reads real time; a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_prompt(batch: int, length: int, seed: int = 0, vocab_size: int = REGULAR_TOKENS) -> Tensor:
    """[batch, length] random ordinary-token ids, reproducible from `seed`."""
    high = min(REGULAR_TOKENS, vocab_size)
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_qwenlm(path: str | os.PathLike, settings: BenchSettings) -> torch.nn.Module:
    """`load_model` with the bench's dtype, device, quantization and config overrides."""
    from .model import load_model

    kwargs: dict[str, Any] = dict(torch_dtype=settings.dtype, device_map=settings.device, progress=False)
    if settings.quantization != "none":
        # load_model takes **config_overrides, so an unknown keyword would be swallowed as a config
        # field and the model silently left unquantized: check for a real parameter instead.
        if "quantization" not in inspect.signature(load_model).parameters:
            raise ValueError(
                f"--quantization {settings.quantization}: this qwenlm's load_model has no quantization= option yet"
            )
        kwargs["quantization"] = settings.quantization
    return load_model(path, **kwargs, **settings.config_overrides)


def run_qwenlm(model: torch.nn.Module, ids: Tensor, gen_len: int, compile: bool | None = None) -> RunTiming:
    """Greedy-generate exactly `gen_len` tokens per row through qwenlm's decode loop, timed (`compile`:
    as `generate_steps` takes it)."""
    from .generation.generate import QWEN_VOCAB_SIZE, generate_steps
    from .generation.params import SamplingParams

    params = SamplingParams(max_new_tokens=gen_len)  # greedy, no eos / stop words: never stops early
    vocab_limit = min(QWEN_VOCAB_SIZE, model.config.vocab_size)  # as generate() limits it to the tokenizer
    device = model.device
    steps: list[list[int]] = []
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        first = None
        for step in generate_steps(model, ids, params, vocab_limit=vocab_limit, compile=compile):
            if first is None:
                _sync(device)
                first = time.perf_counter()
            steps.append(step.token_ids)
        _sync(device)
        end = time.perf_counter()
    rows = [list(row) for row in zip(*steps, strict=True)]  # steps x batch -> batch x steps
    return RunTiming(ttft_s=first - start, total_s=end - start, token_ids=rows)


def load_transformers(qwen2_dir: str | os.PathLike, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """transformers' Qwen2ForCausalLM on converted weights, greedy by default (the copied chat
    generation_config would otherwise sample)."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(qwen2_dir, dtype=dtype).to(device).eval()
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=REGULAR_TOKENS,
                                               pad_token_id=REGULAR_TOKENS)  # fmt: skip
    return model


def run_transformers(model: torch.nn.Module, ids: Tensor, gen_len: int) -> RunTiming:
    """One transformers `generate` of exactly `gen_len` greedy tokens per row, timed; the first new
    token is clocked by a streamer (generate hands it the prompt first, then each new token)."""
    from transformers.generation.streamers import BaseStreamer

    device = model.device

    class FirstTokenClock(BaseStreamer):
        def __init__(self) -> None:
            self.puts = 0
            self.first: float | None = None

        def put(self, value: Tensor) -> None:
            self.puts += 1
            if self.puts == 2:  # put 1 is the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    clock = FirstTokenClock()
    ids = ids.to(device)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=gen_len,
                             min_new_tokens=gen_len, streamer=clock)  # fmt: skip
        _sync(device)
        end = time.perf_counter()
    if out.shape[1] != ids.shape[1] + gen_len:
        raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, expected {gen_len}")
    return RunTiming(ttft_s=clock.first - start, total_s=end - start, token_ids=out[:, ids.shape[1] :].tolist())


@dataclass
class Engine:
    """One side of the comparison: how to load it and how to run one timed generation."""

    name: str
    load: Callable[[], torch.nn.Module]
    run: Callable[[torch.nn.Module, Tensor, int], RunTiming]
    model: torch.nn.Module | None = None
    load_s: float = 0.0
    load_memory: MemoryWindow | None = None
    run_memory: list[MemoryWindow] = field(default_factory=list)
    timings: list[RunTiming] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The whole bench
# --------------------------------------------------------------------------------------------------
def run_bench(settings: BenchSettings, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Load, warm up, run interleaved repeats and return the report (see `format_report`).

    Raises:
        ValueError: unusable settings (e.g. a quantization load_model does not offer).
    """
    from .testing import demo_checkpoint

    path = Path(settings.model) if settings.model else demo_checkpoint(progress=False)
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    tmp: tempfile.TemporaryDirectory | None = None
    try:
        bandwidth = settings.bandwidth_gbps
        if bandwidth is None:
            log("measuring memory bandwidth ...")
            bandwidth = measure_bandwidth_gbps(settings.device)
        engines, notes, tmp = _prepare_engines(path, settings, log)
        for engine in engines:
            _load_engine(engine, settings, log)
        _run_rounds(engines, settings, log)
        return _report(path, settings, engines, bandwidth, notes)
    finally:
        torch.set_num_threads(previous_threads)
        if tmp is not None:
            tmp.cleanup()


def compute_dtype(path: str | os.PathLike, settings: BenchSettings) -> torch.dtype:
    """The dtype qwenlm's loader will pick for these settings (so the peer runs in the same one)."""
    from .model.config import QwenConfig
    from .model.loading import resolve_dtype

    config = QwenConfig.from_pretrained(path, **settings.config_overrides)
    return resolve_dtype(config, torch.device(settings.device), settings.dtype)


def _prepare_engines(path: Path, settings: BenchSettings, log: Callable[[str], None]):
    """The engines to run, notes for the report, and the temp dir holding converted weights.

    Conversion happens here, before any engine loads, so its memory is in no engine's baseline.
    """
    engines = [Engine("qwenlm", load=lambda: load_qwenlm(path, settings),
                      run=lambda model, ids, gen_len: run_qwenlm(model, ids, gen_len, settings.compile))]  # fmt: skip
    notes: list[str] = []
    if settings.compare != "transformers":
        return engines, notes, None
    reason = _transformers_unavailable(settings)
    if reason:
        notes.append(f"transformers skipped: {reason}")
        log(notes[-1])
        return engines, notes, None
    from .convert import convert_to_qwen2

    log("converting the checkpoint to transformers' Qwen2 layout (not timed) ...")
    tmp = tempfile.TemporaryDirectory(prefix="qwenlm-bench-qwen2-")
    try:
        qwen2_dir = convert_to_qwen2(path, tmp.name)
    except ValueError as err:  # a config Qwen2 cannot express (partial rotary, extra biases)
        tmp.cleanup()
        notes.append(f"transformers skipped: {err}")
        log(notes[-1])
        return engines, notes, None
    dtype = compute_dtype(path, settings)
    engines.append(Engine("transformers", load=lambda: load_transformers(qwen2_dir, dtype, settings.device),
                          run=run_transformers))  # fmt: skip
    return engines, notes, tmp


def _transformers_unavailable(settings: BenchSettings) -> str | None:
    if settings.quantization != "none":
        return f"it cannot run qwenlm's {settings.quantization} weights"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed"
    return None


def _load_engine(engine: Engine, settings: BenchSettings, log: Callable[[str], None]) -> None:
    log(f"loading {engine.name} ...")
    with MemoryWindow(settings.device) as window:
        start = time.perf_counter()
        engine.model = engine.load()
        _sync(settings.device)
        engine.load_s = time.perf_counter() - start
    engine.load_memory = window


def _run_rounds(engines: list[Engine], settings: BenchSettings, log: Callable[[str], None]) -> None:
    """Warm-up rounds (short, unmeasured), then `repeats` rounds, engines interleaved in each."""
    vocab = engines[0].model.config.vocab_size
    ids = random_prompt(settings.batch, settings.prompt_len, settings.seed, vocab).to(settings.device)
    warm_ids = ids[:, :WARMUP_PROMPT_LEN]
    compiled = uses_compiled_loop(settings)
    rounds = settings.warmup + settings.repeats
    for r in range(rounds):
        warm = r < settings.warmup
        log(f"{'warm-up' if warm else 'round'} {r + 1 if warm else r + 1 - settings.warmup}/"
            f"{settings.warmup if warm else settings.repeats} ...")  # fmt: skip
        for engine in engines:
            with MemoryWindow(settings.device) as window:
                if warm and compiled and engine.name == "qwenlm":  # the measured shapes: compile here
                    engine.run(engine.model, ids, settings.gen_len)
                elif warm:
                    engine.run(engine.model, warm_ids, min(settings.gen_len, WARMUP_GEN_LEN))
                else:
                    engine.timings.append(engine.run(engine.model, ids, settings.gen_len))
            engine.run_memory.append(window)


def uses_compiled_loop(settings: BenchSettings) -> bool:
    """Whether qwenlm decodes with the static compiled loop in this bench (as generate_steps decides)."""
    from .generation.generate import compile_requested

    return compile_requested(settings.compile, torch.device(settings.device))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def summarize_engine(engine: Engine, settings: BenchSettings, bound_tok_s: float) -> dict[str, Any]:
    """Medians (and bests) of one engine's repeats as rates."""
    B, P, G = settings.batch, settings.prompt_len, settings.gen_len
    ttfts = [t.ttft_s for t in engine.timings]
    decodes = [t.decode_s for t in engine.timings]
    decode = B * (G - 1) / statistics.median(decodes) if G > 1 else None
    memory_key = "peak_gpu_mb" if settings.device == "cuda" else "peak_rss_mb"
    compiled = engine.name == "qwenlm" and uses_compiled_loop(settings)
    return {
        "engine": engine.name,
        "measured": MEASURED["qwenlm-compiled" if compiled else engine.name],
        "load_s": engine.load_s,
        "ttft_s": statistics.median(ttfts),
        "ttft_s_best": min(ttfts),
        "prefill_tok_s": B * P / statistics.median(ttfts),
        "prefill_tok_s_best": B * P / min(ttfts),
        "decode_s": statistics.median(decodes) if G > 1 else None,
        "decode_tok_s": decode,
        "decode_tok_s_best": B * (G - 1) / min(decodes) if G > 1 else None,
        "fraction_of_bound": decode / bound_tok_s if decode is not None else None,
        memory_key: engine_peak_mb(engine.load_memory, engine.run_memory),
        "samples": {"ttft_s": ttfts, "decode_s": decodes},
    }


def _versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"qwenlm": version("qwenlm"), "torch": torch.__version__, "transformers": version("transformers"),
            "python": platform.python_version()}  # fmt: skip


def _machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    machine = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def _report(path: Path, settings: BenchSettings, engines: list[Engine], bandwidth: float,
            notes: list[str]) -> dict[str, Any]:  # fmt: skip
    model = engines[0].model
    config = model.config
    weight_bytes = weight_bytes_per_token(model)
    kv_per_pos = cache_bytes_per_position(model)
    step_bytes = bytes_per_decode_step(weight_bytes, kv_per_pos, settings.batch, settings.prompt_len, settings.gen_len)
    bound = bound_tokens_per_s(step_bytes, bandwidth, settings.batch)
    per_engine = {e.name: summarize_engine(e, settings, bound) for e in engines}
    ours = per_engine["qwenlm"]
    report: dict[str, Any] = {
        "bench": "qwenlm bench",
        "model": str(path),
        "demo_checkpoint": settings.model is None,
        "shape": {
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "mlp_width": config.mlp_width,
            "vocab": config.vocab_size,
            "seq_length": config.seq_length,
        },
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": settings.quantization
        if settings.quantization != "none"
        else checkpoint_quantization(model.config) or "none",  # a GPTQ checkpoint says so itself
        "device": settings.device,
        "threads": torch.get_num_threads(),
        "batch": settings.batch,
        "prompt_len": settings.prompt_len,
        "gen_len": settings.gen_len,
        "preset": settings.preset,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "config_overrides": settings.config_overrides,
        "compiled": uses_compiled_loop(settings),
        **{k: v for k, v in ours.items() if k not in ("engine", "samples")},
        "vmhwm_mb": vmhwm_mb(),
        "weight_bytes_per_token": weight_bytes,
        "kv_bytes_per_step": step_bytes - weight_bytes,
        "bytes_per_step": step_bytes,
        "bandwidth_gbps": bandwidth,
        "bandwidth_source": "given" if settings.bandwidth_gbps else "measured",
        "bound_tok_s": bound,
        "versions": _versions(),
        "machine": _machine(settings.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "engines": per_engine,
        "notes": notes,
    }
    if "transformers" in per_engine:
        report["ratios"] = _ratios(ours, per_engine["transformers"])
        # Same weights, same prompt, both greedy: the outputs should agree (bf16 rounding, or NTK/LogN
        # past seq_length, which Qwen2 lacks, can make them drift apart).
        report["greedy_tokens_agree"] = common_prefix_len(engines[0].timings[0].token_ids,
                                                          engines[1].timings[0].token_ids)  # fmt: skip
    return report


def common_prefix_len(rows_a: list[list[int]], rows_b: list[list[int]]) -> int:
    """How many leading tokens agree in every row of two batches of generated ids."""
    agree = []
    for a, b in zip(rows_a, rows_b, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        agree.append(n)
    return min(agree)


def _ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """qwenlm / transformers for each rate (> 1: qwenlm is faster), on medians."""

    def ratio(key: str) -> float | None:
        return ours[key] / theirs[key] if ours[key] and theirs[key] else None

    return {"prefill": ratio("prefill_tok_s"), "decode": ratio("decode_tok_s"),
            "load": theirs["load_s"] / ours["load_s"]}  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a `run_bench` report."""
    shape = report["shape"]
    memory_key = "peak_gpu_mb" if report["device"] == "cuda" else "peak_rss_mb"
    lines = [
        f"model {report['model']}{' (demo: random weights)' if report['demo_checkpoint'] else ''}: "
        f"{shape['layers']} layers, hidden {shape['hidden']}; {report['dtype']}, quantization "
        f"{report['quantization']}, {report['device']}, {report['threads']} threads",
        f"batch {report['batch']}, prompt {report['prompt_len']}, generate {report['gen_len']}, "
        f"{'static compiled' if report.get('compiled') else 'eager'} decode loop"
        f"{' (preset ' + report['preset'] + ')' if report['preset'] else ''}; median of {report['repeats']} "
        f"interleaved repeats after {report['warmup']} warm-up round(s) (best in brackets)",
        "",
        f"{'engine':<13}{'load s':>8}{'TTFT s':>10}{'prefill tok/s':>22}{'decode tok/s':>20}"
        f"{'of bound':>10}{memory_key.replace('_', ' '):>14}",
    ]
    for e in report["engines"].values():
        lines.append(
            f"{e['engine']:<13}{e['load_s']:>8.2f}{e['ttft_s']:>10.3f}"
            f"{_fmt(e['prefill_tok_s'], '.1f') + ' (' + _fmt(e['prefill_tok_s_best'], '.1f') + ')':>22}"
            f"{_fmt(e['decode_tok_s'], '.2f') + ' (' + _fmt(e['decode_tok_s_best'], '.2f') + ')':>20}"
            f"{_fmt(e['fraction_of_bound'] and 100 * e['fraction_of_bound'], '.0f') + '%':>10}"
            f"{e[memory_key]:>14.0f}"
        )
    if "ratios" in report:
        r = report["ratios"]
        lines.append(f"qwenlm / transformers: prefill {_fmt(r['prefill'], '.2f')}x, decode {_fmt(r['decode'], '.2f')}x"
                     f" (loads {_fmt(r['load'], '.2f')}x as fast); greedy tokens agree for the first "
                     f"{report['greedy_tokens_agree']} of {report['gen_len']}")  # fmt: skip
    lines += [
        "",
        f"bound: {report['bytes_per_step'] / 1e9:.3f} GB read per decode step (weights without the embedding "
        f"{report['weight_bytes_per_token'] / 1e9:.3f} GB + KV cache at the mean context "
        f"{report['kv_bytes_per_step'] / 1e6:.2f} MB) at {report['bandwidth_gbps']:.1f} GB/s "
        f"({report['bandwidth_source']}) -> {report['bound_tok_s']:.2f} tok/s",
        f"process peak RSS (VmHWM) {report['vmhwm_mb']:.0f} MiB; memory columns are each engine's own MiB "
        "over its pre-load baseline",
    ]
    lines += [f"measured: {e['engine']}: {e['measured']}" for e in report["engines"].values()]
    lines += [f"note: {n}" for n in report["notes"]]
    if any((e["fraction_of_bound"] or 0) > 1 for e in report["engines"].values()):
        lines.append("note: decode ran above the bound: the bandwidth probe (one moment's reading) found the memory "
                     "slower than the decode did; on shared or virtual machines it varies by half within minutes, "
                     "so compare engines by their ratio, or pass --bandwidth")  # fmt: skip
    return "\n".join(lines)


def write_report(report: dict[str, Any], as_json: bool = False, output: str | os.PathLike | None = None) -> str:
    """The text to print (JSON or the table); also writes the JSON to `output` when given."""
    text = json.dumps(report, indent=2)
    if output is not None:
        write_text_atomic(output, text + "\n")
    return text if as_json else format_report(report)
