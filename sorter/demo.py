"""The embedded default: everything a newcomer needs to see sorter work, made locally, no set-up.

Today it covers the vision core: a synthetic product catalog, a model trained on it (cached), an
evaluation on photos it never saw, and an attention map. The streaming worker plugs in here next.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sorter.data.synth import write_dataset
from sorter.logs import get_logger
from sorter.paths import cache_dir
from sorter.progress import progress_bar
from sorter.settings import KafkaSettings

log = get_logger("sorter.demo")

DEMO_CLASSES = 10
DEMO_SIZE = (320, 240)
#: Bump when the demo recipe changes, so a stale cached model is retrained rather than reused.
DEMO_RECIPE = "v3-mobilenet_v2-128px-10cls"  # v3: with an unknown-product threshold (issue #12)


@dataclass(frozen=True)
class DemoFiles:
    root: Path
    data: Path
    test: Path
    checkpoint: Path


def demo_files(root: Path | None = None) -> DemoFiles:
    root = (root or cache_dir() / "demo") / DEMO_RECIPE
    return DemoFiles(root, root / "data", root / "test", root / "model.pt")


def ensure_demo_model(root: Path | None = None, *, device: str = "auto") -> DemoFiles:
    """Train the demo model on synthetic products unless a cached one exists (about a minute on 2 cores)."""
    from sorter.train.trainer import TrainConfig, train

    files = demo_files(root)
    if files.checkpoint.is_file():
        log.info("demo.model_cached", checkpoint=str(files.checkpoint))
        return files
    shutil.rmtree(files.root, ignore_errors=True)
    per_class = {"train": 40, "val": 10, "test": 15}
    with progress_bar(DEMO_CLASSES * sum(per_class.values()), "rendering demo photos") as advance:
        for seed, (split, n) in enumerate(per_class.items()):
            folder = files.test if split == "test" else files.data / split
            write_dataset(folder, DEMO_CLASSES, n, seed=100 + seed, size=DEMO_SIZE, progress=advance)
    shutil.copy(files.data / "train" / "skus.json", files.data / "skus.json")
    config = TrainConfig(backbone="mobilenet_v2", epochs=6, image_size=128, device=device, model_version="demo-1")
    train(files.data, files.checkpoint, config)
    return files


def write_demo_routes(path: Path, skus: list[str]) -> Path:
    lines = [
        "# demo routing table: one chute per SKU, a review chute for unsure decisions",
        "default_chute: C-99",
        "review_chute: REVIEW",
        "min_confidence: 0.80",
        "# an item photographed by two cameras is decided from both views together (within 150 ms)",
        "fusion: {window_ms: 150, views: 2}",
        "routes:",
    ]
    lines += [f"  {sku}: C-{i + 1:02d}" for i, sku in enumerate(skus)]
    path.write_text("\n".join(lines) + "\n")
    return path


class Stations:
    """Simulated conveyor stations publishing to ``frames.<station>`` (see ``sorter.traffic.simulate``):
    two cameras per item (fused: one decision from both views), ~1% corrupt frames to show the dead-letter
    path, ~5% products the demo model was not trained on to show the unknown-product path."""

    def __init__(self, kafka: KafkaSettings, stations: list[str], rate: float, seed: int = 0) -> None:
        import threading

        from sorter.traffic.simulate import Simulator

        self.sim = Simulator(
            stations,
            rate,
            frames_per_item=(2, 2),
            classes=DEMO_CLASSES,
            size=DEMO_SIZE,
            corrupt_fraction=0.01,
            unknown_fraction=0.05,
            seed=seed,
        )
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=self.sim.publish, args=(kafka,), kwargs={"stop": self.stop_event}, daemon=True
        )

    @property
    def items_sent(self) -> int:
        return self.sim.items_sent

    def start(self) -> Stations:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(35)


class LiveView:
    """Reads what the actuators would read (commands) and the dead letters, and renders a summary."""

    def __init__(self, kafka: KafkaSettings) -> None:
        import threading
        from collections import Counter, deque

        from confluent_kafka import Consumer

        from sorter.stream.kafka import kafka_config

        self.consumer = Consumer(
            kafka_config(
                kafka,
                {"session.timeout.ms": 6000, "fetch.wait.max.ms": 20},
                required={"group.id": "sorter-demo-view", "auto.offset.reset": "earliest", "enable.auto.commit": False},
            )
        )
        self.consumer.subscribe([kafka.commands_topic, kafka.dlq_topic])
        self.commands_topic = kafka.commands_topic
        self.chutes: Counter = Counter()
        self.reasons: Counter = Counter()
        self.dead: Counter = Counter()
        self.latencies: deque = deque(maxlen=2000)
        self.recent: deque = deque(maxlen=8)
        self.total = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LiveView:
        self.thread.start()
        return self

    def _run(self) -> None:
        import json

        while not self.stop_event.is_set():
            for m in self.consumer.consume(200, 0.2):
                if m.error() is not None:
                    continue
                if m.topic() == self.commands_topic:
                    c = json.loads(m.value())
                    self.total += 1
                    self.chutes[c["chute"]] += 1
                    self.reasons[c["reason"]] += 1
                    ts_type, produced_ms = m.timestamp()  # when the worker sent it, not when we read it
                    if c.get("captured_at") and ts_type:
                        self.latencies.append(produced_ms - c["captured_at"])
                    self.recent.appendleft(c)
                else:
                    self.dead[dict(m.headers() or []).get("dlq-reason", b"?").decode()] += 1
        self.consumer.close()

    def render(self, elapsed: float, items_sent: int):
        import numpy as np
        from rich.console import Group
        from rich.table import Table

        lat = np.array(self.latencies) if self.latencies else np.array([0])
        head = Table.grid(padding=(0, 3))
        head.add_row(
            f"[bold]{elapsed:5.1f} s[/]",
            f"items sent {items_sent}",
            f"routed {self.total}",
            f"throughput {self.total / max(elapsed, 1e-9):.1f} items/s",
            f"latency p50 {np.percentile(lat, 50):.0f} ms  p95 {np.percentile(lat, 95):.0f} ms",
            f"dead letters {sum(self.dead.values())} {dict(self.dead) or ''}",
        )
        chutes = Table(title="commands by chute", title_justify="left")
        chutes.add_column("chute")
        chutes.add_column("items", justify="right")
        for chute, n in sorted(self.chutes.items()):
            chutes.add_row(chute, str(n))
        recent = Table(title="latest routed items", title_justify="left")
        for col in ("item", "station", "cameras", "label", "confidence", "chute", "reason"):
            recent.add_column(col)
        for c in list(self.recent):
            cameras = "+".join(c.get("cameras") or []) or c.get("camera_id") or "-"  # fused: every view's camera
            recent.add_row(
                c["item_id"], c["station_id"], cameras, c["label"] or "-", f"{c['confidence']:.3f}", c["chute"],
                c["reason"],
            )  # fmt: skip
        grid = Table.grid(padding=(0, 4))
        grid.add_row(chutes, recent)
        return Group(head, grid)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


def run_streaming_demo(duration: float, stations: int, rate: float, device: str = "auto") -> None:
    """Broker + Redis + simulated stations + the worker + a live view, until ``duration`` or Ctrl-C."""
    import json
    import tempfile
    import threading
    import time

    from rich.console import Console
    from rich.live import Live

    from sorter.logs import configure_logging
    from sorter.services import redis_server, tansu_broker
    from sorter.settings import load_settings
    from sorter.stream.app import build_worker
    from sorter.stream.kafka import ensure_topics

    console = Console()
    files = ensure_demo_model(device=device)
    work = Path(tempfile.mkdtemp(prefix="sorter-demo-"))
    console.print(f"starting a local broker and Redis (logs in {work})")
    broker = tansu_broker(workdir=work).start()
    redis_ = redis_server(workdir=work).start()
    bootstrap = f"127.0.0.1:{broker.port}"
    names = [f"dock-{i + 1}" for i in range(stations)]
    skus = json.loads((files.data / "skus.json").read_text())
    routes = write_demo_routes(work / "routes.yaml", list(skus.values()))
    settings = load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": "sorter-demo",
            "session_timeout_ms": 6000,
            "fetch_wait_max_ms": 20,
            "metadata_refresh_ms": 1000,
        },
        redis={"url": f"redis://127.0.0.1:{redis_.port}/0"},
        model={"checkpoint": files.checkpoint, "device": device},
        routes=routes,
    )
    log_file = (work / "worker.log").open("w")
    configure_logging("info", stream=log_file)  # JSON logs to a file: the terminal shows the live view
    view = simulator = worker = thread = None
    try:
        ensure_topics(
            settings.kafka,
            {f"frames.{s}": 2 for s in names} | {settings.kafka.commands_topic: 1, settings.kafka.dlq_topic: 1},
        )
        worker = build_worker(settings)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        ready_by = time.monotonic() + 30
        while not worker.assigned and thread.is_alive() and time.monotonic() < ready_by:
            time.sleep(0.05)  # the stations start once the worker has joined its group
        simulator = Stations(settings.kafka, names, rate).start()
        view = LiveView(settings.kafka).start()
        started = time.monotonic()
        with Live(view.render(0, 0), console=console, refresh_per_second=4) as live:
            try:
                while (elapsed := time.monotonic() - started) < duration and thread.is_alive():
                    live.update(view.render(elapsed, simulator.items_sent))
                    time.sleep(0.25)
            except KeyboardInterrupt:
                pass
        console.print("stopping: stations, worker (drains and commits), view, broker, Redis")
    finally:
        if simulator is not None:
            simulator.stop()
        if worker is not None and thread is not None:
            worker.stop_event.set()
            thread.join(settings.shutdown_deadline_s)
        if view is not None:
            time.sleep(0.5)
            view.stop()
        broker.stop()
        redis_.stop()
        log_file.close()
    if worker is not None:
        s = worker.stats
        console.print(
            f"worker: {s.frames} frames, {s.commands} commands, {s.cache_hits} cache hits, "
            f"dead letters {dict(s.dead_letters)}; JSON logs: {work / 'worker.log'}"
        )


@dataclass(frozen=True)
class DemoModelReport:
    checkpoint: Path
    evaluation: object  # sorter.train.metrics.Evaluation on the unseen photos
    photo: Path  # the photo explained
    label: str
    sku: str
    confidence: float
    pictures: tuple[Path, ...]  # training curves, confusion matrix, attention map


def show_demo_model(device: str = "auto") -> DemoModelReport:
    """``sorter demo-model``: the demo model (trained once, cached), scored on its unseen photos, with a
    confusion matrix and the attention map of one photo."""
    from sorter.train.evaluate import evaluate_folder
    from sorter.train.explain import explain_image
    from sorter.train.plots import plot_confusion

    files = ensure_demo_model(device=device)
    score = evaluate_folder(files.test, files.checkpoint, device=device)
    confusion_png = files.root / "confusion.png"
    plot_confusion(score.evaluation.confusion, score.classes, confusion_png, title="demo model on unseen photos")
    photo = sorted(files.test.glob("*/*.jpg"))[0]
    explanation = explain_image(photo, files.checkpoint, files.root / "attention.png", device=device)
    label, sku, p = explanation.top[0]
    pictures = (files.root / "model.curves.png", confusion_png, files.root / "attention.png")
    return DemoModelReport(files.checkpoint, score.evaluation, photo, label, sku, p, pictures)
