"""What ops watch: Prometheus metrics and the Kubernetes health endpoints, on one small HTTP server.

- ``/metrics``: Prometheus text format (prometheus-client, one registry per worker);
- ``/livez``: 200 while the loop makes progress: a batch finished, or an idle poll returned, within
  ``liveness_timeout_s``. A batch stuck in the model longer than that is *not* live, even though the
  consumer keeps its group membership meanwhile: a restart is the cure for a wedged model;
- ``/readyz``: 200 when the model is loaded, partitions are assigned, a broker is reachable (from
  librdkafka's statistics: at least one broker connection ``UP``) and no batch is waiting for the broker
  to take its commands. A pod that owns no partition is not ready: it serves nothing. The body says
  which condition failed.

Counters are updated once per batch by the worker (no per-frame locking); values that live elsewhere
(consumer lag, Redis errors, partitions owned) are read when Prometheus scrapes, through the small
:class:`WorkerView` protocol: this module does not know the worker.

Names follow Prometheus' conventions: counters end in ``_total`` (added by the client), gauges and
histograms in their unit (``_seconds``, ``_frames``, ``_messages``, ``_partitions``), or ``_up`` /
``_info``. Error series exist at 0 before the first error, because ``rate()`` and ``increase()`` take a
series' first sample as its start, and a counter born at 1 would hide the first error from an alert:
Kafka errors for both clients and dead letters of station ``unknown`` from start-up, and a station's
dead letters, for every reason, from the first frame or command of that station on. The alerts and the
dashboard built on these names are in ``deploy/base/prometheusrule.yaml`` and ``deploy/base/dashboards/``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Collection, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sorter.errors import ConfigError
from sorter.logs import get_logger
from sorter.stream.contracts import STATION_ID_PATTERN, FrameError, RawFrame, header_text, station_from_topic
from sorter.stream.timeline import STAGES

if TYPE_CHECKING:
    from sorter.stream.accounting import WorkerStats
    from sorter.stream.pipeline import BatchResult

log = get_logger("sorter.observe")

METRICS_PATH, LIVENESS_PATH, READINESS_PATH = "/metrics", "/livez", "/readyz"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
ITEM_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
KAFKA_CLIENTS = ("consumer", "producer")
# Every reason a frame is dead-lettered for (FrameError in contracts and pipeline, FrameDecodeError in
# preprocess and the decoder); tests/test_observe.py checks the list against the code.
DEAD_LETTER_REASONS = (
    "bad_header",
    "bad_key",
    "missing_item_id",
    "bad_item_id",
    "missing_station_id",
    "bad_station_id",
    "bad_captured_at",
    "bad_camera_id",
    "empty_payload",
    "payload_too_large",
    "unknown_format",
    "unsupported_format",
    "too_many_pixels",
    "corrupt_image",
    "undecodable",
)
UNKNOWN_STATION, OTHER_STATION = "unknown", "other"
MAX_LABEL_CHARS = 64  # station label values are cut to this many characters (a station id may have 128)
MAX_STATIONS = 256  # distinct station label values per worker; any more are counted as "other"


def dead_letter_station(raw: RawFrame, topic_prefix: str) -> str | None:
    """The station a dead letter came from, as far as a frame that broke the contract tells: its
    ``station-id`` header if that is readable and a valid id, else the station its topic names."""
    header = None
    if raw.header_error is None:
        with contextlib.suppress(FrameError):  # not UTF-8
            header = header_text(raw.headers, "station-id")
    if header is not None and STATION_ID_PATTERN.match(header):
        return header
    return station_from_topic(raw.source.topic, topic_prefix)


class StationLabels:
    """Station label values with bounded cardinality: a valid station id cut to ``MAX_LABEL_CHARS``,
    ``unknown`` where there is none, and past ``limit`` distinct stations ``other`` (a producer that
    invents station ids must not make a series per id). ``on_new`` runs once per new station."""

    def __init__(self, limit: int, on_new: Callable[[str], None]) -> None:
        self.limit, self.on_new = limit, on_new
        self.seen: set[str] = set()
        self.overflowed = False

    def __call__(self, station: str | None) -> str:
        if not station or not STATION_ID_PATTERN.match(station):
            return UNKNOWN_STATION
        station = station[:MAX_LABEL_CHARS]
        if station not in self.seen:
            if len(self.seen) >= self.limit:
                if not self.overflowed:
                    self.overflowed = True
                    log.warning("metrics.too_many_stations", limit=self.limit, counted_as=OTHER_STATION)
                    self.on_new(OTHER_STATION)
                return OTHER_STATION
            self.seen.add(station)
            self.on_new(station)
        return station


class Metrics:
    def __init__(self, topic_prefix: str = "frames.", max_stations: int = MAX_STATIONS) -> None:
        self.topic_prefix = topic_prefix
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("sorter_frames_consumed", "frames read from the frame topics", ["topic"], registry=r)
        self.decoded = Counter("sorter_frames_decoded", "frames decoded and classified", registry=r)
        self.dead = Counter(
            "sorter_frames_dead_lettered",
            "frames sent to the dead-letter topic, by the station they came from (unknown: none readable)",
            ["station", "reason"],
            registry=r,
        )
        self.cache = Counter("sorter_cache_lookups", "decision-cache lookups by result", ["result"], registry=r)
        self.commands = Counter(
            "sorter_commands", "routing commands delivered", ["station", "chute", "reason"], registry=r
        )
        self.late = Counter(
            "sorter_late_frames",
            "frames past their station's decision deadline when read: not classified, item sent to the late chute",
            ["station"],
            registry=r,
        )
        self.fused = Counter(
            "sorter_fused_items",
            "multi-camera items decided from their views together, by whether every expected camera's view came "
            "in time (complete=false: the window closed first)",
            ["station", "complete"],
            registry=r,
        )
        self.fusion_held = Gauge(
            "sorter_fusion_held_frames",
            "views held open, their items waiting for more views (not committed)",
            registry=r,
        )
        self.batches = Counter("sorter_batches", "batches processed", registry=r)
        self.batch_frames = Histogram("sorter_batch_frames", "frames per batch", buckets=BATCH_BUCKETS, registry=r)
        self.decode_s = Histogram("sorter_decode_seconds", "decode time per batch", buckets=STAGE_BUCKETS, registry=r)
        self.infer_s = Histogram("sorter_inference_seconds", "model time per batch", buckets=STAGE_BUCKETS, registry=r)
        self.batch_s = Histogram(
            "sorter_batch_seconds", "batch time, consume to commit", buckets=STAGE_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "sorter_end_to_end_latency_seconds",
            "captured-at to routing command delivered",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.item_stage_s = Histogram(
            "sorter_item_stage_seconds",
            "each routed item's latency cut into stages (broker, collect, queue, cache, decode, infer, route, "
            "deliver, commit: README, 'Where the milliseconds go')",
            ["stage"],
            buckets=ITEM_STAGE_BUCKETS,
            registry=r,
        )
        for stage in STAGES:
            self.item_stage_s.labels(stage)
        self.kafka_errors = Counter("sorter_kafka_errors", "librdkafka errors reported", ["client"], registry=r)
        self.fetch_stalls = Counter(
            "sorter_fetch_stalls",
            "times a partition with frames waiting on the broker gave none for kafka.fetch_stall_s",
            registry=r,
        )
        self.stalled = Gauge(
            "sorter_stalled_partitions", "partitions with frames waiting that give none (fetch stalls)", registry=r
        )
        for client in KAFKA_CLIENTS:
            self.kafka_errors.labels(client)
        self.reloads = Counter(
            "sorter_model_reloads",
            "new checkpoints at the model path: loaded and served, or refused (the previous model serves on)",
            ["result"],
            registry=r,
        )
        for result in ("loaded", "refused"):
            self.reloads.labels(result)
        # a shadow model's (shadow.py): exported only when one runs (enable_shadow)
        self.shadow_compared = Counter(
            "sorter_shadow_compared",
            "items the live and the candidate (shadow) model both decided, by the live chute and whether the "
            "candidate agreed: same (chute and label), other_label (same chute), other_chute",
            ["station", "chute", "agreement"],
            registry=None,
        )
        self.shadow_commands = Counter(
            "sorter_shadow_commands", "the candidate's decisions, by reason", ["station", "reason"], registry=None
        )
        self.shadow_batch_s = Histogram(
            "sorter_shadow_batch_seconds", "the candidate's time per batch (decode and model)", buckets=STAGE_BUCKETS,
            registry=None,
        )  # fmt: skip
        self.shadow_skipped = Counter(
            "sorter_shadow_skipped_frames", "frames the candidate could not take (its queue was full)", registry=None
        )
        self.shadow_errors = Counter(
            "sorter_shadow_errors", "candidate batches that failed and shadow commands not delivered", registry=None
        )
        self.canary_rollbacks = Counter(
            "sorter_canary_rollbacks", "canaries rolled back by themselves (canary.py)", registry=None
        )
        self.canary_active = Gauge(
            "sorter_canary_active", "1 while a candidate model decides at the canary stations", registry=None
        )
        self.model_info = Gauge(
            "sorter_model_info",
            "the loaded model (value 1)",
            ["backbone", "version", "classes", "image_size", "device", "precision"],
            registry=r,
        )
        self.station = StationLabels(max_stations, self._new_station)
        self._new_station(UNKNOWN_STATION)

    def enable_canary(self) -> None:
        """Export the canary's series (a worker without one has none)."""
        self.registry.register(self.canary_rollbacks)
        self.registry.register(self.canary_active)

    def enable_shadow(self) -> None:
        """Export the shadow model's series (a worker without one has none)."""
        for metric in (self.shadow_compared, self.shadow_commands, self.shadow_batch_s, self.shadow_skipped,
                       self.shadow_errors):  # fmt: skip
            self.registry.register(metric)

    def set_model(self, model) -> None:
        """``sorter_model_info`` names the model serving (one series: a reload replaces it)."""
        self.model_info.clear()
        self.model_info.labels(
            backbone=model.meta.backbone,
            version=model.model_version,
            classes=str(model.meta.num_classes),
            image_size=str(model.input_size),
            device=str(model.runtime.device),
            precision=model.precision,
        ).set(1)

    def _new_station(self, station: str) -> None:
        for reason in DEAD_LETTER_REASONS:
            self.dead.labels(station=station, reason=reason)
        self.late.labels(station)
        for complete in ("true", "false"):
            self.fused.labels(station, complete)

    def observe_batch(self, result: BatchResult, frames_by_topic: dict[str, int], seconds: float):
        delivered_ms = result.times.delivered
        for topic, n in frames_by_topic.items():
            self.frames.labels(topic).inc(n)
            if (station := station_from_topic(topic, self.topic_prefix)) is not None:
                self.station(station)  # its dead-letter series start at 0
        self.batches.inc()
        self.batch_frames.observe(result.frames)
        self.batch_s.observe(seconds)
        if result.classified:
            self.decoded.inc(result.classified)
            self.infer_s.observe(result.infer_s)
            self.decode_s.observe(result.decode_s)
        looked_up = result.frames - len(result.dead_letters)
        self.cache.labels("hit").inc(result.cache_hits)
        self.cache.labels("miss").inc(max(0, looked_up - result.cache_hits))
        for d in result.dead_letters:
            station = self.station(dead_letter_station(d.raw, self.topic_prefix))
            self.dead.labels(station=station, reason=d.reason).inc()
        for f in result.late:
            self.late.labels(self.station(f.station_id)).inc()
        for item in result.fused:
            self.fused.labels(self.station(item.key[1]), str(item.complete).lower()).inc()
        self.fusion_held.set(result.held_frames)
        for c in result.commands:
            self.commands.labels(station=self.station(c.station_id), chute=c.chute, reason=c.reason).inc()
            if c.captured_at and delivered_ms:
                self.latency.observe(max(0.0, (delivered_ms - c.captured_at) / 1000))
            for stage, ms in result.times.stages(c.captured_at, c.source.key).items():
                self.item_stage_s.labels(stage).observe(ms / 1000)


class WorkerView(Protocol):
    """What the health endpoints and the scrape-time metrics read of a running worker."""

    stats: WorkerStats
    health: Health
    metrics: Metrics
    last_progress: float

    @property
    def assigned(self) -> Collection[tuple[str, int]]: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def blocked_s(self) -> float | None:
        """Seconds the batch in hand has waited for the broker to take its messages (None: not waiting)."""

    @property
    def cache_up(self) -> bool: ...

    @property
    def cache_errors(self) -> int: ...


class WorkerCollector(Collector):
    """Read at scrape time from the worker's own state."""

    def __init__(self, worker: WorkerView) -> None:
        self.worker = worker

    def collect(self) -> Iterator:
        w = self.worker
        lag = GaugeMetricFamily(
            "sorter_consumer_lag_messages", "messages behind the partition end", labels=["topic", "partition"]
        )
        for (topic, partition), value in sorted(w.health.lag.items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield GaugeMetricFamily("sorter_assigned_partitions", "frame partitions owned", value=len(w.assigned))
        yield GaugeMetricFamily(
            "sorter_progress_age_seconds",
            "since the loop last made progress",
            value=time.monotonic() - w.last_progress,
        )
        yield GaugeMetricFamily("sorter_broker_up", "1 if a broker connection is up", value=float(w.health.broker_up))
        yield GaugeMetricFamily("sorter_cache_up", "1 if Redis answers", value=float(w.cache_up))
        yield CounterMetricFamily("sorter_redis_errors", "Redis calls that failed", value=w.cache_errors)
        yield CounterMetricFamily("sorter_producer_restarts", "producers recreated", value=w.stats.producer_restarts)
        yield GaugeMetricFamily(
            "sorter_delivery_blocked_seconds",
            "how long the batch in hand has waited for the broker to take its messages (0: not waiting)",
            value=w.blocked_s or 0.0,
        )
        yield CounterMetricFamily(
            "sorter_delivery_retries",
            "times a batch's undelivered messages were sent again",
            value=w.stats.delivery_retries,
        )
        yield CounterMetricFamily(
            "sorter_frames_dropped_on_revoke",
            "frames collected from a partition that was then revoked (read again by its new owner)",
            value=w.stats.revoked_dropped,
        )
        yield CounterMetricFamily(
            "sorter_batches_unfinished",
            "batches given up at the shutdown deadline (read again)",
            value=w.stats.unfinished_batches,
        )
        yield CounterMetricFamily(
            "sorter_slow_batches", "batches that needed the keep-alive", value=w.stats.slow_batches
        )


class Health:
    """Broker reachability and lag from librdkafka statistics (``stats_cb``); each report, parsed, is also
    handed to the ``listeners`` (the worker's fetch watch)."""

    def __init__(self) -> None:
        self.broker_up = False
        self.seen_stats = False
        self.lag: dict[tuple[str, int], int] = {}
        self.listeners: list[Callable[[dict], None]] = []

    def on_stats(self, raw: str) -> None:
        try:
            stats = json.loads(raw)
        except ValueError:
            return
        if not isinstance(stats, dict):
            return
        self.seen_stats = True
        brokers = stats.get("brokers", {}).values()
        self.broker_up = any(b.get("state") == "UP" and b.get("nodeid", -1) >= 0 for b in brokers)
        lag = {}
        for topic, t in stats.get("topics", {}).items():
            for pid, p in t.get("partitions", {}).items():
                if pid == "-1" or p.get("consumer_lag", -1) < 0:
                    continue
                lag[(topic, int(pid))] = p["consumer_lag"]
        self.lag = lag
        for listener in self.listeners:  # runs inside consume(): a failure here must not stop the loop
            try:
                listener(stats)
            except Exception as exc:
                log.warning("observe.stats_listener_failed", error=f"{type(exc).__name__}: {exc}")


def readiness(worker: WorkerView) -> list[str]:
    """What keeps the worker from being ready (empty: ready)."""
    problems = []
    if not worker.assigned:
        problems.append("no partitions assigned")
    if not worker.health.broker_up:
        problems.append("no broker reachable" if worker.health.seen_stats else "no broker statistics yet")
    if worker.blocked_s is not None:
        problems.append(f"commands not delivered for {worker.blocked_s:.0f} s: waiting for the broker")
    if worker.stopping:
        problems.append("stopping")
    return problems


def liveness(worker: WorkerView, timeout_s: float) -> list[str]:
    if worker.blocked_s is not None:  # waiting for the broker, retrying: alive (a restart would not help)
        return []
    stalled = time.monotonic() - worker.last_progress
    return [f"no progress for {stalled:.1f} s (limit {timeout_s} s)"] if stalled > timeout_s else []


def port_taken(host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(
        f"port {port} on {host} for /metrics and the probes is taken ({exc.strerror}): pass "
        "--metrics-port (0 picks a free one) or set SORTER_OBSERVE__PORT"
    )


class ObservabilityServer:
    """``/metrics``, ``/livez``, ``/readyz`` on ``host:port`` in a daemon thread."""

    def __init__(self, worker: WorkerView, host: str, port: int, liveness_timeout_s: float) -> None:
        registry = worker.metrics.registry
        registry.register(WorkerCollector(worker))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == METRICS_PATH:
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in (LIVENESS_PATH, "/healthz"):
                    self._verdict(liveness(worker, liveness_timeout_s))
                elif path == READINESS_PATH:
                    self._verdict(readiness(worker))
                else:
                    self._send(404, b"not found: /metrics, /livez, /readyz\n", "text/plain")

            def _verdict(self, problems: list[str]) -> None:
                body = ("ok\n" if not problems else "; ".join(problems) + "\n").encode()
                self._send(503 if problems else 200, body, "text/plain; charset=utf-8")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every few seconds: not news
                pass

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # taken since start-up checked it: still one line, not a traceback
            raise port_taken(host, port, exc) from None
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="observe", daemon=True)

    def start(self) -> ObservabilityServer:
        self.thread.start()
        log.info("observe.listening", port=self.port, paths=["/metrics", "/livez", "/readyz"])
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
