"""Every Prometheus metric of the service, defined in one place (names follow Prometheus conventions)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# Millisecond-scale work, up to past GRU_REQUEST_TIMEOUT_SECONDS' default (30 s), so a stalled queue shows
# in quantiles rather than only in +Inf: 0.5 ms .. 60 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EVICTION_REASONS = ("ttl", "capacity", "tenant_quota")
# queue_full: refused by the queue; queue_full_unread: refused at the edge, before the body was read
REJECT_REASONS = ("queue_full", "queue_full_unread", "timeout")
STREAM_METHOD = "WS"  # the method label of stream upgrades refused and of stream chunks
disable_created_metrics()  # *_created series double the exposition and no dashboard or rule reads them


class FrameCounts(Collector):
    """``gru_stream_frames_total``: stream frames received (in) and answered (out), kept as plain numbers that
    the event loop adds to and a scrape reads; a labelled counter's lock and calls, twice a frame, were a
    measurable share of a stream chunk's cost (docs/bench.md part 10)."""

    def __init__(self) -> None:
        self.received = 0
        self.answered = 0

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gru_stream_frames", "WebSocket stream frames, received (in) and answered (out)", labels=["direction"]
        )
        family.add_metric(["in"], self.received)
        family.add_metric(["out"], self.answered)
        yield family


class Metrics:
    """One registry per app, so tests can run several apps in one process without clashes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gru_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "gru_request_duration_seconds", "HTTP request latency", ["route", "method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.active_sessions = Gauge("gru_active_sessions", "Sessions currently held", registry=r)
        self.evictions = Counter("gru_session_evictions", "Sessions dropped", ["reason"], registry=r)
        # model and version labels: only loaded versions (a version's series go when it is unloaded)
        self.steps = Counter("gru_steps", "Time steps run through the model", ["model", "version"], registry=r)
        self.batch_size = Histogram(
            "gru_batch_size", "Chunks per engine batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "gru_queue_wait_seconds", "Time a chunk waits before its batch runs", buckets=LATENCY_BUCKETS, registry=r
        )
        self.forward_time = Histogram(
            "gru_forward_seconds", "Model time per engine batch", ["model", "version"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.version_sessions = Gauge(
            "gru_model_version_sessions", "Sessions whose state belongs to a loaded version (at the last check)",
            ["model", "version"], registry=r,
        )
        self.store_errors = Counter("gru_store_errors", "Session store failures", ["operation"], registry=r)
        self.store_conflicts = Counter(
            "gru_store_conflicts", "Compare-and-set writes that lost a race and were judged again", registry=r
        )
        self.rejected = Counter("gru_rejected", "Chunks refused before running", ["reason"], registry=r)
        self.streams_open = Gauge("gru_streams_open", "WebSocket streams open", registry=r)
        self.stream_frames = FrameCounts()
        r.register(self.stream_frames)
        self.model_info = Info("gru_model", "The served model", registry=r)
        self.surprises = Counter(
            "gru_surprises", "Arriving session values whose p-value was under GRU_SURPRISE_P", ["model"], registry=r
        )
        # the surprise share's denominator: not the steps run, which count a step's F values once (and stateless calls)
        self.scored_values = Counter(
            "gru_scored_values", "Arriving session values scored against a prediction (calibrated models)", ["model"],
            registry=r,
        )
        self.model_versions = Gauge(
            "gru_model_versions", "Loaded model versions (1 each), by state: serving or draining",
            ["model", "version", "state"], registry=r,
        )
        self.versions_skipped = Counter(
            "gru_model_versions_skipped", "Repository versions refused: damaged, half-written or incompatible",
            ["model"], registry=r,
        )
        # per model with GRU_SNAPSHOT_PATH: a failed write is only logged otherwise, and a crash then loses
        # every session change since the last good one
        self.snapshot_failures = Counter(
            "gru_snapshot_failures", "Snapshot writes that failed (periodic or final)", ["model"], registry=r
        )
        # no sample until a snapshot is known (restored or written): a 0 reads as one written in 1970
        self.snapshot_written = Gauge(
            "gru_snapshot_last_success_timestamp_seconds", "When the model's last snapshot was written whole",
            ["model"], registry=r,
        )
        self.version_evictions = Counter(
            "gru_model_version_evictions", "Versions unloaded beyond GRU_MAX_LOADED_VERSIONS while holding"
            " sessions", ["model"], registry=r,
        )
        # Labelled series exist from the first scrape, so rules and dashboards resolve before any event.
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason=reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
