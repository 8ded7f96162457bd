"""`/metrics`: the server's and the engine's numbers in the Prometheus text format (no client library).

Engine-side numbers (requests, queue depth, tokens, prefix-cache hits, decode tokens/s, time to
first token over recent requests) come from `EngineClient.stats()`; the HTTP side (requests by
route and status, time to first token as the client sees it, request latency) is counted here.

    metrics = ServerMetrics(); text = metrics.render(engine.stats())
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence

from ..engine.protocol import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "qwenlm"

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUANTILES = (0.5, 0.9, 0.99)


class Histogram:
    """A cumulative Prometheus histogram over fixed bucket bounds (seconds)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        out += [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]
        return out


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _quantile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServerMetrics:
    """HTTP-side counters, updated by the app and the serving code, rendered with the engine's stats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http_requests: Counter[tuple[str, str, int]] = Counter()
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.request_latency = Histogram(LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def observe_time_to_first_token(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def observe_request(
        self, method: str, route: str, status: int, seconds: float, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        with self._lock:
            self.http_requests[(method, route, status)] += 1
            self.request_latency.observe(seconds)
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def render(self, stats: EngineStats | None) -> str:
        """The whole exposition text (ends with a newline)."""
        lines: list[str] = []
        if stats is not None:
            lines += _engine_lines(stats)
        with self._lock:
            lines += _family(
                f"{PREFIX}_http_requests_total",
                "counter",
                "HTTP requests by method, route and status.",
                (
                    f'{PREFIX}_http_requests_total{{method="{_label(m)}",route="{_label(r)}",status="{s}"}} {n}'
                    for (m, r, s), n in sorted(self.http_requests.items())
                ),
            )
            lines += _family(
                f"{PREFIX}_http_prompt_tokens_total",
                "counter",
                "Prompt tokens of answered requests.",
                [f"{PREFIX}_http_prompt_tokens_total {self.prompt_tokens}"],
            )
            lines += _family(
                f"{PREFIX}_http_completion_tokens_total",
                "counter",
                "Completion tokens of answered requests.",
                [f"{PREFIX}_http_completion_tokens_total {self.completion_tokens}"],
            )
            name = f"{PREFIX}_http_time_to_first_token_seconds"
            lines += _family(
                name,
                "histogram",
                "From request arrival to the first generated token (server side).",
                self.time_to_first_token.lines(name),
            )
            name = f"{PREFIX}_http_request_duration_seconds"
            lines += _family(
                name, "histogram", "Whole request, to the last byte of the response.", self.request_latency.lines(name)
            )
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def _engine_lines(stats: EngineStats) -> list[str]:
    p = PREFIX
    free_blocks = stats.kv_blocks_total - stats.kv_blocks_used
    queries, hits = stats.prefix_cache_queries_total, stats.prefix_cache_hits_total
    simple = [
        ("requests_total", "counter", "Requests the engine accepted.", stats.requests_total),
        ("requests_running", "gauge", "Requests being generated now.", stats.requests_running),
        ("requests_waiting", "gauge", "Requests queued for room (queue depth).", stats.requests_waiting),
        ("prompt_tokens_total", "counter", "Prompt tokens received by the engine.", stats.prompt_tokens_total),
        ("generation_tokens_total", "counter", "Tokens generated by the engine.", stats.generation_tokens_total),
        (
            "cached_prompt_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            stats.cached_prompt_tokens_total,
        ),
        ("tokens_per_second", "gauge", "Recent aggregate decode throughput.", stats.tokens_per_second),
        ("kv_cache_blocks_total", "gauge", "Blocks of the paged KV cache.", stats.kv_blocks_total),
        ("kv_cache_blocks_used", "gauge", "KV blocks held by requests.", stats.kv_blocks_used),
        ("kv_cache_blocks_free", "gauge", "KV blocks free (cached prefixes included).", free_blocks),
        ("kv_cache_blocks_cached", "gauge", "Free KV blocks holding a cached prefix.", stats.kv_blocks_cached),
        ("preemptions_total", "counter", "Requests preempted for KV blocks (recomputed).", stats.preemptions_total),
        ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", queries),
        ("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", hits),
        ("prefix_cache_hit_rate", "gauge", "Prefix-cache hits / queries, in prompt tokens.", hits / max(queries, 1)),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in simple:
        lines += _family(f"{p}_{name}", kind, help_text, [f"{p}_{name} {_number(value)}"])
    samples = list(stats.time_to_first_token_seconds)
    name = f"{p}_time_to_first_token_seconds"
    body = [f'{name}{{quantile="{q}"}} {_number(_quantile(samples, q))}' for q in QUANTILES] if samples else []
    body += [f"{name}_sum {_number(float(stats.time_to_first_token_sum))}",
             f"{name}_count {stats.time_to_first_token_count}"]  # fmt: skip
    help_text = "Engine time to first token: quantiles over the last 256 requests, sum and count over all."
    lines += _family(name, "summary", help_text, body)
    return lines
