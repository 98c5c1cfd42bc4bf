"""The recording format: round trip, damage found and located, growth followed, strangers refused."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from sorter.traffic.recording import MAGIC, Reader, Record, RecordingDamaged, RecordingError, Writer


def records(n: int) -> list[Record]:
    out = []
    for i in range(n):
        headers = (("item-id", f"item-{i}".encode()), ("station-id", b"dock-1"), ("empty", None), ("bin", b"\xff\x00"))
        out.append(
            Record(
                topic=f"frames.dock-{i % 2}",
                partition=i % 3,
                offset=1000 + i,
                timestamp_ms=None if i == 3 else 1_795_700_000_000 + 10 * i,
                key=None if i == 4 else f"item-{i}".encode(),
                headers=headers,
                value=None if i == 5 else bytes([i % 256]) * (i * 37),
                recorded_at_ms=1_795_700_000_500 + i,
            )
        )
    return out


def write(path, recs, meta=None):
    with Writer(path, meta or {"who": "test"}) as w:
        for r in recs:
            w.write(r)
    return path


def test_round_trip_keeps_every_field_and_the_order(tmp_path):
    recs = records(40)
    path = write(tmp_path / "a.sorterrec", recs)
    reader = Reader.open(path)
    assert list(reader.records()) == recs
    assert reader.meta["who"] == "test" and reader.meta["format"] == "sorterrec"
    assert reader.verify() == (40, None)


def test_a_truncated_tail_says_where_and_keeps_what_came_before(tmp_path):
    path = write(tmp_path / "a.sorterrec", records(10))
    data = path.read_bytes()
    path.write_bytes(data[:-25])  # a recorder killed mid-write
    reader = Reader.open(path)
    with pytest.raises(RecordingDamaged) as info:
        list(reader.records())
    damage = info.value
    assert damage.intact == 9 and "truncated record" in str(damage) and f"at byte {damage.position}" in str(damage)
    assert list(reader.records(allow_damaged=True)) == records(10)[:9]
    assert reader.damage is not None and reader.damage.position == damage.position


def test_a_flipped_byte_is_caught_by_the_record_checksum(tmp_path):
    recs = records(10)
    path = write(tmp_path / "a.sorterrec", recs)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    reader = Reader.open(path)
    n, damage = reader.verify()
    assert damage is not None and "checksum mismatch" in damage.what
    assert 0 < n < 10 and list(reader.records(allow_damaged=True)) == recs[:n]


def test_a_garbage_length_is_damage_not_a_huge_allocation(tmp_path):
    path = write(tmp_path / "a.sorterrec", records(3))
    with path.open("ab") as f:
        f.write(struct.pack(">II", 0xFFFFFFF0, 0) + b"x" * 10)
    n, damage = Reader.open(path).verify()
    assert n == 3 and "corrupt record length" in damage.what


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04 a zip file", "not a sorter recording"),
        (b"", "not a sorter recording"),
        (MAGIC + struct.pack(">HI", 7, 2) + b"{}" + b"\0\0\0\0", "version 7 is not supported"),
    ],
)
def test_unknown_formats_and_versions_are_refused_by_name(tmp_path, content, message):
    path = tmp_path / "x.sorterrec"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=message):
        Reader.open(path)


def test_an_existing_file_is_not_overwritten(tmp_path):
    path = write(tmp_path / "a.sorterrec", records(1))
    with pytest.raises(RecordingError, match="exists"):
        Writer(path)


def test_a_reader_can_follow_a_recording_while_it_grows(tmp_path):
    path = tmp_path / "live.sorterrec"
    recs = records(30)
    writer = Writer(path)
    done = threading.Event()

    def produce():
        for r in recs:
            writer.write(r)
            time.sleep(0.003)
        writer.close()
        done.set()

    got = []
    thread = threading.Thread(target=produce)
    thread.start()
    for r in Reader.open(path).records(follow=True, stop=done.is_set, poll_s=0.01):
        got.append(r)
    thread.join()
    assert got == recs
