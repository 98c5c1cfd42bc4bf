"""Stage 5's application: the bench's model in a Quix Streams application, written as its API invites.

One message at a time through a StreamingDataFrame (Quix's defaults: at-least-once, offsets committed
every 5 s, commands produced without waiting for each acknowledgement), the photo classified like the
naive loop does (``OnePhoto``). Run by ``sorter bench --quix-python PY`` in its own process, with the
interpreter of a virtual environment that has the ``bench-quix`` extra (Quix Streams pins an older
confluent-kafka than sorter's own environment uses)::

    PY -m sorter.bench.quix_app --broker HOST:PORT --group G --frames T --commands T --checkpoint FILE
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sorter.bench.quix_app")
    ap.add_argument("--broker", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--frames", required=True, help="the station topic to read")
    ap.add_argument("--commands", required=True, help="the topic to write routing commands to")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from quixstreams import Application

    from sorter.bench.one_at_a_time import OnePhoto

    classify = OnePhoto(args.checkpoint, args.device)
    app = Application(
        broker_address=args.broker, consumer_group=args.group, auto_offset_reset="earliest", loglevel="WARNING"
    )
    frames = app.topic(args.frames, key_deserializer="bytes", value_deserializer="bytes")
    commands = app.topic(args.commands, key_serializer="bytes", value_serializer="json")

    def command(photo: bytes, key: bytes, _timestamp: int, _headers) -> dict:
        label, confidence = classify(photo)
        return {"item_id": key.decode(), "label": label, "confidence": confidence}

    app.dataframe(frames).apply(command, metadata=True).to_topic(commands)
    app.run()


if __name__ == "__main__":
    main()
