"""`protege serve`'s own counters, rendered as Prometheus text on `/metrics`."""

from __future__ import annotations

from dataclasses import dataclass, field

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS_S = (0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=lambda: {"specialist": 0, "fallback": 0})
    errors: dict[int, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    """Model calls, by how many requests each answered."""
    switches: int = 0
    """Times the served deployment changed (protege deploy / rollback, followed by the server)."""
    alarm: dict | None = None
    """The alarm in force (guard.py), None while healthy."""

    @property
    def batches(self) -> int:
        return sum(dict(self.batch_sizes).values())  # a copy: the model thread adds to it

    @property
    def batched_requests(self) -> int:
        return sum(size * n for size, n in dict(self.batch_sizes).items())

    def observe_batch(self, size: int) -> None:
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def observe(self, seconds: float, answered_by: str) -> None:
        self.requests[answered_by] = self.requests.get(answered_by, 0) + 1
        self.latency_sum += seconds
        for i, b in enumerate(LATENCY_BUCKETS_S):
            if seconds <= b:
                self.buckets[i] += 1
                break
        else:
            self.buckets[-1] += 1

    def render(self, model: str) -> bytes:
        total = sum(self.requests.values())
        # a copy: the model thread adds batch sizes while this runs on the event loop
        sizes = dict(self.batch_sizes)
        batches, batched = sum(sizes.values()), sum(size * n for size, n in sizes.items())
        lines = ["# HELP protege_serve_requests_total Chat completions answered, by who answered.",
                 "# TYPE protege_serve_requests_total counter"]
        for who, n in self.requests.items():
            lines.append(f'protege_serve_requests_total{{model="{model}",answered_by="{who}"}} {n}')
        lines += ["# HELP protege_serve_errors_total Requests refused or failed, by HTTP status.",
                  "# TYPE protege_serve_errors_total counter"]
        for code, n in sorted(self.errors.items()):
            lines.append(f'protege_serve_errors_total{{status="{code}"}} {n}')
        lines += ["# HELP protege_serve_latency_seconds Time from request to response, server side.",
                  "# TYPE protege_serve_latency_seconds histogram"]
        cum = 0
        for b, n in zip(LATENCY_BUCKETS_S, self.buckets):
            cum += n
            lines.append(f'protege_serve_latency_seconds_bucket{{le="{b}"}} {cum}')
        lines.append(f'protege_serve_latency_seconds_bucket{{le="+Inf"}} {total}')
        lines.append(f"protege_serve_latency_seconds_sum {self.latency_sum}")
        lines.append(f"protege_serve_latency_seconds_count {total}")
        rate = self.requests.get("fallback", 0) / total if total else 0.0
        lines += ["# HELP protege_serve_fallback_rate Share of requests answered by the fallback model.",
                  "# TYPE protege_serve_fallback_rate gauge", f"protege_serve_fallback_rate {rate}",
                  "# HELP protege_serve_batch_size_mean Mean requests per model call.",
                  "# TYPE protege_serve_batch_size_mean gauge",
                  f"protege_serve_batch_size_mean {batched / batches if batches else 0}",
                  "# HELP protege_serve_batch_size Requests per model call.",
                  "# TYPE protege_serve_batch_size histogram"]
        cum = 0
        for b in BATCH_BUCKETS:
            cum += sum(n for size, n in sizes.items() if b // 2 < size <= b)
            lines.append(f'protege_serve_batch_size_bucket{{le="{b}"}} {cum}')
        lines += [f'protege_serve_batch_size_bucket{{le="+Inf"}} {batches}',
                  f"protege_serve_batch_size_sum {batched}", f"protege_serve_batch_size_count {batches}",
                  "# HELP protege_serve_deployment_switches_total Times the served deployment changed.",
                  "# TYPE protege_serve_deployment_switches_total counter",
                  f"protege_serve_deployment_switches_total {self.switches}",
                  "# HELP protege_serve_alarm 1 while an alarm is in force (kind: agreement, input drift, label drift).",
                  "# TYPE protege_serve_alarm gauge",
                  f'protege_serve_alarm{{kind="{(self.alarm or {}).get("kind", "none")}"}} {int(self.alarm is not None)}']
        return ("\n".join(lines) + "\n").encode()
