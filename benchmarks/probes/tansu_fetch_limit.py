"""How many record batches a local Tansu partition may hold before a fetch no longer finishes within
``fetch.wait.max.ms`` (not a test). A producer sends one frame per batch, as a camera does
(``batch.num.messages`` 1, 200-byte frames), up to each count; then a fresh consumer with each fetch
wait reads the last 500 frames, 3 s allowed. Tansu answers a fetch empty when reading to the fetch
offset takes longer than the wait: "0 in 3.00s" is a stalled partition.

    .venv/bin/python benchmarks/probes/tansu_fetch_limit.py 2000,5000,10000,20000 1,5,20,50
    .venv/bin/python benchmarks/probes/tansu_fetch_limit.py 40000,80000,120000,160000 20,50,100
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from sorter.services import tansu_broker
from sorter.settings import KafkaSettings
from sorter.stream.kafka import ensure_topics


def main(counts: list[int], waits: list[int]) -> None:
    broker = tansu_broker(workdir=Path(tempfile.mkdtemp())).start()
    bootstrap = f"127.0.0.1:{broker.port}"
    ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), {"one": 1})
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1, "enable.idempotence": True})
    stored = 0
    try:
        for n in counts:
            started = time.time()
            for _ in range(n - stored):
                while True:
                    try:
                        p.produce("one", b"z" * 200)
                        break
                    except BufferError:
                        p.poll(0.05)
                p.poll(0)
            p.flush(60)
            stored = n
            results = []
            for wait in waits:
                config = {"bootstrap.servers": bootstrap, "group.id": "x", "enable.auto.commit": False}
                c = Consumer(config | {"fetch.wait.max.ms": wait})
                c.assign([TopicPartition("one", 0, max(0, n - 500))])
                t0, got = time.time(), 0
                while time.time() - t0 < 3 and got < 500:
                    got += len([m for m in c.consume(500, 0.2) if not m.error()])
                results.append(f"wait {wait}: {got} in {time.time() - t0:.2f}s")
                c.close()
            print(f"{n:6d} stored ({time.time() - started:.1f}s):", " | ".join(results), flush=True)
    finally:
        broker.stop()


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1].split(",")], [int(x) for x in sys.argv[2].split(",")])
