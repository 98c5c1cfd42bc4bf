"""Tansu alone under the int8 soak's shape (not a test): a paced camera (150 frames/s, three single-partition
topics, 25.6 KB payloads, linger 0) and a plain consumer-group consumer (fetch.wait.max.ms 50, synchronous
commits every 32 frames), no model. Prints frames consumed and the worst lag every 10 s. A second argument
makes the consumer slower than the camera (frames/s it takes at most), so that a backlog builds as it does
behind a model that cannot keep up.

    .venv/bin/python benchmarks/probes/tansu_paced.py 400
    .venv/bin/python benchmarks/probes/tansu_paced.py 420 110
"""

from __future__ import annotations

import multiprocessing as mp
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer

from sorter.services import tansu_broker
from sorter.settings import KafkaSettings
from sorter.stream.kafka import ensure_topics, kafka_config

RATE, TOPICS, PAYLOAD = 150.0, 3, b"x" * 25_600


def camera(bootstrap: str, prefix: str, seconds: float) -> None:
    p = Producer(kafka_config(KafkaSettings(bootstrap_servers=bootstrap), {"linger.ms": 0}))
    started, i = time.perf_counter(), 0
    while (due := started + i / RATE) - started < seconds:
        if due > time.perf_counter():
            time.sleep(due - time.perf_counter())
        p.produce(f"{prefix}.s{i % TOPICS}", PAYLOAD, str(time.time()).encode())  # key: the send time
        p.poll(0)
        i += 1
    print("camera produced", i, "undelivered", p.flush(60), flush=True)


def main(seconds: float, consume_rate: float | None = None) -> None:
    broker = tansu_broker(workdir=Path(tempfile.mkdtemp())).start()
    bootstrap = f"127.0.0.1:{broker.port}"
    prefix = f"soak{uuid.uuid4().hex[:4]}"
    topics = [f"{prefix}.s{i}" for i in range(TOPICS)]
    settings = KafkaSettings(bootstrap_servers=bootstrap)
    ensure_topics(settings, dict.fromkeys(topics, 1))
    overrides = {"group.id": prefix, "auto.offset.reset": "earliest", "enable.auto.commit": False}
    c = Consumer(kafka_config(settings, overrides | {"fetch.wait.max.ms": 50}))
    c.subscribe(topics)
    while not c.assignment():
        c.poll(0.2)
    proc = mp.get_context("spawn").Process(target=camera, args=(bootstrap, prefix, seconds))
    proc.start()
    started, lags, n, reported = time.time(), [], 0, 0
    try:
        while proc.is_alive() or time.time() - started < seconds + 30:
            m = c.poll(0.2)
            if m is not None and not m.error():
                if consume_rate:
                    time.sleep(1 / consume_rate)
                n += 1
                lags.append(time.time() - float(m.key().decode()))
                if n % 32 == 0:
                    c.commit(asynchronous=False)
            if time.time() - started >= reported + 10:
                reported += 10
                rss = broker_rss_mb(broker)
                print(
                    f"t={reported:4d}s consumed {n:6d} max lag {max(lags, default=float('nan')):6.2f}s "
                    f"broker rss {rss} MB",
                    flush=True,
                )
                lags = []
    finally:
        c.close()
        broker.stop()


def broker_rss_mb(broker) -> int | None:
    try:
        status = Path(f"/proc/{broker.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) // 1024
    except (AttributeError, OSError):
        return None


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 400.0, float(sys.argv[2]) if len(sys.argv) > 2 else None)
