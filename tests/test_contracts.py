import pytest

from sorter.stream.contracts import FrameError, RawFrame, Source, dead_letter_headers, parse_frame

SRC = Source("frames.dock-1", 2, 41)


def raw(headers=(), key=b"item-1", value=b"jpeg", topic="frames.dock-1"):
    return RawFrame(Source(topic, 2, 41), key, value, tuple(headers))


def test_headers_give_the_ids():
    f = parse_frame(
        raw(
            [
                ("item-id", b"it-9"),
                ("station-id", b"dock-3"),
                ("camera-id", b"cam-2"),
                ("captured-at", b"1795700000000"),
            ]
        )
    )
    assert (f.item_id, f.station_id, f.camera_id, f.captured_at_ms) == ("it-9", "dock-3", "cam-2", 1795700000000)


def test_missing_ids_come_from_key_and_topic():
    f = parse_frame(raw())
    assert (f.item_id, f.station_id, f.camera_id, f.captured_at_ms) == ("item-1", "dock-1", None, None)


@pytest.mark.parametrize(
    "frame, reason",
    [
        (raw(key=None), "missing_item_id"),
        (raw(key=None, headers=[("station-id", b"s")]), "missing_item_id"),
        (raw(topic="cameras", headers=[]), "missing_station_id"),
        (raw(key=b"\xff\xfe"), "bad_key"),
        (raw(headers=[("station-id", b"\xff")]), "bad_header"),
        (raw(headers=[("item-id", b"has spaces and /slashes")]), "bad_item_id"),
        (raw(headers=[("captured-at", b"yesterday")]), "bad_captured_at"),
        (raw(headers=[("captured-at", b"1795700000")]), "bad_captured_at"),  # seconds, not ms
        (raw(headers=[("captured-at", b"99999999999999999")]), "bad_captured_at"),
        (raw(value=b""), "empty_payload"),
        (raw(value=None), "empty_payload"),
    ],
)
def test_contract_violations_have_reasons(frame, reason):
    with pytest.raises(FrameError) as err:
        parse_frame(frame)
    assert err.value.reason == reason


def test_dead_letter_keeps_original_headers_and_says_why():
    r = raw([("item-id", b"x"), ("weird", None)])
    headers = dict(dead_letter_headers(r, "corrupt_image", "FrameDecodeError", "truncated", "w-1"))
    assert headers["item-id"] == b"x" and headers["weird"] == b""
    assert headers["dlq-reason"] == b"corrupt_image"
    assert headers["dlq-error-class"] == b"FrameDecodeError"
    assert (headers["dlq-source-topic"], headers["dlq-source-partition"], headers["dlq-source-offset"]) == (
        b"frames.dock-1",
        b"2",
        b"41",
    )
    assert headers["dlq-worker-id"] == b"w-1"
