"""The bad-input corpus: every hostile or broken frame ends in the dead-letter topic with a reason a
person can act on, the good frames around it are routed, and the worker never stops."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter

import cv2
import numpy as np
import pytest
from confluent_kafka import Producer
from PIL import Image

from sorter.stream.app import build_worker
from sorter.stream.kafka import ensure_topics
from tests.figures import report
from tests.integration.conftest import consume_all
from tests.integration.test_worker import NOW_MS, photos

pytestmark = pytest.mark.integration


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, format="GIF")
    return out.getvalue()


def test_the_bad_input_corpus_is_dead_lettered_with_actionable_reasons(settings_for, namespace, bootstrap):
    settings = settings_for(batch={"max_size": 8, "max_wait_ms": 5, "max_payload_bytes": 400_000})
    topic = f"{namespace}-frames.dock-4"
    ensure_topics(settings.kafka, {topic: 1})
    good = [p for _, p in photos(12, seed=21)]
    jpeg = good[0]
    ok = {"captured-at": str(NOW_MS).encode()}
    rng = np.random.default_rng(5)
    corpus = {  # key -> (value, headers, the reason expected)
        "trunc": (jpeg[: len(jpeg) // 2], ok, "corrupt_image"),
        "garbage-after-soi": (b"\xff\xd8\xff" + rng.bytes(3000), ok, "unknown_format"),
        "zero": (b"", ok, "empty_payload"),
        "random": (rng.bytes(5000), ok, "unknown_format"),
        "huge": (jpeg + b"\0" * 500_000, ok, "payload_too_large"),
        "bomb": (png_claiming(50_000, 50_000), ok, "too_many_pixels"),
        "gif": (gif(), ok, "unsupported_format"),
        "ts-text": (jpeg, {"captured-at": b"yesterday"}, "bad_captured_at"),
        "ts-absurd": (jpeg, {"captured-at": b"99999999999999"}, "bad_captured_at"),
        "station-bytes": (jpeg, {"station-id": b"\xff\xfe\xfa"}, "bad_header"),
        "id-spaces": (jpeg, {"item-id": b"item with spaces!"}, "bad_item_id"),
    }
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    expected_good = []
    for i, (key, (value, headers, _)) in enumerate(corpus.items()):
        item = f"{namespace}-good-{i}"
        p.produce(topic, good[i], item.encode(), headers=list(ok.items()))
        expected_good.append(item)
        p.produce(topic, value, f"{namespace}-{key}".encode(), headers=list(headers.items()))
    p.produce(topic, jpeg, None, headers=[])  # no key, no item-id: missing_item_id
    p.produce(topic, jpeg, b"\xff\xfe", headers=[])  # key not UTF-8 and no item-id header: bad_key
    p.produce(topic, good[-1], f"{namespace}-good-last".encode(), headers=list(ok.items()))
    expected_good.append(f"{namespace}-good-last")
    assert p.flush(30) == 0
    total = 2 * len(corpus) + 3

    worker = build_worker(settings)
    stats = worker.run(max_frames=total, idle_exit_s=30)
    assert stats.frames == total  # the worker went through all of it

    commands = consume_all(bootstrap, settings.kafka.commands_topic, expect=len(expected_good))
    assert sorted(json.loads(m.value())["item_id"] for m in commands) == sorted(expected_good)
    dead = consume_all(bootstrap, settings.kafka.dlq_topic, expect=len(corpus) + 2)
    got = {}
    for m in dead:
        h = dict(m.headers())
        key = (m.key() or b"").decode("utf-8", "replace").removeprefix(f"{namespace}-")
        got[key] = h["dlq-reason"].decode()
        assert h["dlq-error-message"] and h["dlq-error-class"] and h["dlq-source-offset"]
        if key in corpus:
            assert m.value() == corpus[key][0]  # the original bytes, whatever they were
    want = {k: reason for k, (_, _, reason) in corpus.items()} | {"": "missing_item_id", "\ufffd\ufffd": "bad_key"}
    assert got == want
    report(
        "bad input corpus",
        frames=total,
        routed=len(commands),
        dead_letters=len(dead),
        by_reason=dict(Counter(got.values())),
        lost=0,
    )


def test_frames_over_the_size_limits_never_stop_the_worker(settings_for, namespace, bootstrap):
    """Real limits: librdkafka's 1 MB message.max.bytes on the worker's producer (its default), the
    dead-letter topic created with Kafka's default 1 MB max.message.bytes (Apache Kafka applies it; Tansu
    accepts anything), cameras allowed 30 MB. A 25 MB frame, a 1.2 MB corrupt one, a 0-byte one and one
    with a 2 MB camera-id header, among good frames: all good frames routed, every bad one dead-lettered
    (without its payload where it cannot fit), the worker alive and committed past all of them."""
    import hashlib

    from confluent_kafka.admin import AdminClient, NewTopic

    settings = settings_for(batch={"max_size": 4, "max_wait_ms": 5})
    topic = f"{namespace}-frames.dock-5"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics(
        [
            NewTopic(topic, 1, 1, config={"max.message.bytes": str(30_000_000)}),
            NewTopic(settings.kafka.dlq_topic, 1, 1, config={"max.message.bytes": "1048588"}),
        ]
    ).values():
        f.result(30)
    good = [p for _, p in photos(5, seed=31)]
    ok = [("captured-at", str(NOW_MS).encode())]
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(good[1], np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    bad = {
        "huge-25mb": (good[0] + b"\0" * 25_000_000, ok, "payload_too_large"),
        "corrupt-1m2": (png[: len(png) // 2] + np.random.default_rng(1).bytes(1_200_000), ok, "corrupt_image"),
        "zero": (b"", ok, "empty_payload"),
        "camera-2mb": (good[2], [*ok, ("camera-id", b"c" * 2_000_000)], "bad_camera_id"),
    }
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 30_000_000})
    expected = []
    for i, (key, (value, headers, _)) in enumerate(bad.items()):
        item = f"{namespace}-good-{i}"
        p.produce(topic, good[i], item.encode(), headers=ok)
        expected.append(item)
        p.produce(topic, value, f"{namespace}-{key}".encode(), headers=headers)
    p.produce(topic, good[4], f"{namespace}-good-last".encode(), headers=ok)
    expected.append(f"{namespace}-good-last")
    assert p.flush(60) == 0
    total = 2 * len(bad) + 1

    worker = build_worker(settings)
    stats = worker.run(max_frames=total, idle_exit_s=30)
    assert stats.frames == total

    commands = consume_all(bootstrap, settings.kafka.commands_topic, expect=len(expected))
    assert sorted(json.loads(m.value())["item_id"] for m in commands) == sorted(expected)
    dead = consume_all(bootstrap, settings.kafka.dlq_topic, expect=len(bad))
    got = {}
    for m in dead:
        h = dict(m.headers())
        key = m.key().decode().removeprefix(f"{namespace}-")
        got[key] = h["dlq-reason"].decode()
        original = bad[key][0]
        assert len(m) <= 1_000_000
        if h.get("dlq-payload-omitted") == b"true":
            assert int(h["dlq-payload-size"]) == len(original)
            assert h["dlq-payload-sha256"].decode() == hashlib.sha256(original).hexdigest()
        else:
            assert m.value() == original
    assert got == {k: reason for k, (_, _, reason) in bad.items()}
    report("hostile frames at real size limits", frames=total, routed=len(commands), dead_letters=len(dead), lost=0)
