import pytest

from sorter.stream.contracts import FrameError, RawFrame, Source, dead_letter, parse_frame

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
    m = dead_letter(r, "corrupt_image", "FrameDecodeError", "truncated", "w-1", max_bytes=1_000_000)
    assert m.value == r.value and m.key == r.key and m.smaller is not None
    headers = dict(m.headers)
    assert headers["item-id"] == b"x" and headers["weird"] == b""
    assert headers["dlq-reason"] == b"corrupt_image"
    assert headers["dlq-error-class"] == b"FrameDecodeError"
    assert (headers["dlq-source-topic"], headers["dlq-source-partition"], headers["dlq-source-offset"]) == (
        b"frames.dock-1",
        b"2",
        b"41",
    )
    assert headers["dlq-worker-id"] == b"w-1"


def test_a_dead_letter_too_large_for_the_limit_goes_without_payload_key_or_headers_that_do_not_fit():
    import hashlib

    big = RawFrame(Source("frames.dock-1", 0, 7), b"k" * 5000, b"\x17" * 2_000_000, (("camera-id", b"c" * 900_000),))
    m = dead_letter(big, "bad_camera_id", "FrameError", "too long", "w-1", max_bytes=100_000)
    h = dict(m.headers)
    assert m.value == b"" and m.key is None and m.size <= 100_000 and m.smaller is None
    assert h["dlq-payload-omitted"] == b"true" and int(h["dlq-payload-size"]) == 2_000_000
    assert h["dlq-payload-sha256"].decode() == hashlib.sha256(big.value).hexdigest()
    assert h["dlq-key-omitted"] == b"5000 bytes" and h["dlq-headers-omitted"].startswith(b"1 headers")
    assert h["dlq-reason"] == b"bad_camera_id" and h["dlq-source-offset"] == b"7"


def test_dead_letter_sizes_count_header_names_as_utf8_bytes():
    r = RawFrame(Source("frames.dock-1", 0, 7), b"k", b"x" * 10, (("€" * 100_000, b"v"),))
    m = dead_letter(r, "bad_header", "FrameError", "odd", "w-1", max_bytes=200_000)
    assert sum(len(k.encode()) for k, _ in m.headers) < 200_000  # 300 kB of name: not kept
    assert m.size <= 200_000 and dict(m.headers)["dlq-headers-omitted"].startswith(b"1 headers, 300001 bytes")
