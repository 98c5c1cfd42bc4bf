"""The traffic commands (record, replay, simulate, inspect, diff); registered on the main CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sorter.cli_options import BootstrapOpt, BrokerWaitOpt, ConfigOpt, JsonOpt, example, print_json
from sorter.errors import SorterError

err_console = Console(stderr=True)


def _kafka(config: Path | None, bootstrap: str | None, broker_wait: float):
    """The Kafka settings every traffic command's clients are built from (broker, SASL/TLS), once the
    broker answered: no broker is one line and exit 2, before anything is written."""
    from sorter.settings import load_settings
    from sorter.stream.kafka import wait_for_broker

    kafka = load_settings(config, kafka={"bootstrap_servers": bootstrap} if bootstrap else None).kafka
    wait_for_broker(kafka, broker_wait)
    return kafka


def record(
    out: Annotated[Path, typer.Option("--out", "-o", help="recording file to create (.sorterrec)")],
    topics: Annotated[str, typer.Option(help="regex (^...) or comma-separated topic names")] = r"^frames\..+",
    start: Annotated[
        str, typer.Option("--from", help="earliest (what the topics retain) or latest (from now)")
    ] = "latest",
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    max_messages: Annotated[int | None, typer.Option(help="stop after this many messages")] = None,
    idle_exit: Annotated[float | None, typer.Option(help="stop after this many seconds without a message")] = None,
    broker_wait: BrokerWaitOpt = 30.0,
    bootstrap_servers: BootstrapOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Capture messages (topic, partition, offset, timestamp, key, headers, photo) into a recording file."""
    from sorter import __version__
    from sorter.traffic.capture import capture, stop_on_signals
    from sorter.traffic.recording import Writer

    if start not in ("earliest", "latest"):
        raise SorterError("--from must be earliest or latest")
    kafka = _kafka(config, bootstrap_servers, broker_wait)  # before the file: no empty recording
    writer = Writer(
        out, {"topics": topics, "bootstrap_servers": kafka.bootstrap_servers, "sorter_version": __version__}
    )
    stop = threading.Event()
    stop_on_signals(stop)
    stats = capture(
        kafka,
        topics,
        writer,
        start=start,
        duration_s=duration,
        max_messages=max_messages,
        idle_exit_s=idle_exit,
        stop=stop,
    )
    err_console.print(f"{out}: {stats.records} messages, {stats.bytes / 1e6:.1f} MB in {stats.seconds:.1f} s")


def replay(
    recording: Annotated[Path, typer.Argument(metavar="RECORDING", help="a .sorterrec file")],
    speed: Annotated[float, typer.Option(help="time scale: 10 plays ten times faster than recorded")] = 1.0,
    max_rate: Annotated[bool, typer.Option("--max-rate", help="ignore the recorded timing", metavar="")] = False,
    loop: Annotated[int, typer.Option(help="play it N times (item ids suffixed :r2, :r3, ...)")] = 1,
    topic_map: Annotated[list[str] | None, typer.Option(help="OLD=NEW topic rename (repeatable)")] = None,
    topic_prefix: Annotated[str, typer.Option(help="prefix for every topic, e.g. staging.")] = "",
    station: Annotated[list[str] | None, typer.Option(help="only these stations (repeatable)")] = None,
    restamp: Annotated[bool, typer.Option(help="set captured-at to the publish time", metavar="")] = False,
    allow_damaged: Annotated[
        bool, typer.Option(help="replay the intact records before any damage", metavar="")
    ] = False,
    direct: Annotated[bool, typer.Option(help="no broker: feed the worker's pipeline in-process", metavar="")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="--direct: model checkpoint")] = None,
    routes: Annotated[Path | None, typer.Option(help="--direct: routing table")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="--direct: routing commands as JSON lines")] = None,
    broker_wait: BrokerWaitOpt = 30.0,
    bootstrap_servers: BootstrapOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a recording again with its keys and headers, on its recorded schedule scaled by --speed."""
    from sorter.traffic.recording import Reader
    from sorter.traffic.replay import ReplayPlan, parse_topic_map

    plan = ReplayPlan(
        speed=None if max_rate else speed,
        loops=loop,
        topic_map=parse_topic_map(topic_map or []),
        topic_prefix=topic_prefix,
        stations=frozenset(station) if station else None,
        restamp=restamp,
    )
    reader = Reader.open(recording)
    if direct:
        from sorter.settings import load_settings
        from sorter.traffic.replay import replay_direct_to

        overrides = {"model": {"checkpoint": checkpoint} if checkpoint else None, "routes": routes}
        settings = load_settings(config, redis={"enabled": False}, **overrides)
        summary = replay_direct_to(out, reader, settings, plan, allow_damaged=allow_damaged)
        err_console.print(
            f"{summary['frames']} frames -> {summary['commands']} commands, {summary['dead_letters']} dead letters, "
            f"{summary['cache_hits']} repeats" + (f"; commands in {out}" if out else "")
        )
    else:
        from sorter.traffic.replay import replay_to_kafka

        kafka = _kafka(config, bootstrap_servers, broker_wait)
        stop = threading.Event()
        from sorter.traffic.capture import stop_on_signals

        stop_on_signals(stop)
        report = replay_to_kafka(reader, kafka, plan, allow_damaged=allow_damaged, stop=stop.is_set)
        summary = report.summary()
        err_console.print(
            f"sent {summary['sent']} in {summary['seconds']} s ({summary['rate_per_s']}/s); behind schedule "
            f"p50 {summary['lag_p50_ms']} ms, p99 {summary['lag_p99_ms']} ms, max {summary['lag_max_ms']} ms"
        )
    if as_json:
        print_json(summary)


def _frames_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise SorterError(f"--frames-per-item {text!r}: expected K or LO-HI") from None


def simulate(
    stations: Annotated[int, typer.Option(help="conveyor stations (frames.station-1, ...)")] = 3,
    rate: Annotated[float, typer.Option(help="items per second per station")] = 5.0,
    duration: Annotated[float | None, typer.Option(help="seconds (required with --out)")] = None,
    frames_per_item: Annotated[str, typer.Option(help="photos per item: K, or LO-HI drawn per item")] = "1",
    camera_poses: Annotated[
        bool,
        typer.Option(
            "--camera-poses",
            help="each camera of an item sees its own pose (face, side, back), occlusion and lighting",
            metavar="",
        ),
    ] = False,
    classes: Annotated[int, typer.Option(help="products in the synthetic catalog")] = 10,
    width: Annotated[int, typer.Option(help="photo width")] = 640,
    height: Annotated[int, typer.Option(help="photo height")] = 480,
    corrupt_fraction: Annotated[float, typer.Option(help="share of photos cut short (dead-letter path)")] = 0.0,
    unknown_fraction: Annotated[
        float, typer.Option(help="share of items that are products outside the --classes (unknown-product path)")
    ] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    run_id: Annotated[str | None, typer.Option(help="item-id infix (default random: ids unique per run)")] = None,
    topic_prefix: Annotated[str, typer.Option(help="frames topic prefix")] = "frames.",
    partitions: Annotated[int, typer.Option(help="partitions of the station topics it creates")] = 1,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write a recording instead of publishing")] = None,
    broker_wait: BrokerWaitOpt = 30.0,
    bootstrap_servers: BootstrapOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Synthetic conveyor traffic: several stations, several frames per item, jittered spacing."""
    from sorter.traffic.simulate import Simulator

    sim = Simulator(
        [f"station-{i + 1}" for i in range(stations)],
        rate,
        frames_per_item=_frames_range(frames_per_item),
        classes=classes,
        size=(width, height),
        corrupt_fraction=corrupt_fraction,
        unknown_fraction=unknown_fraction,
        camera_poses=camera_poses,
        seed=seed,
        topic_prefix=topic_prefix,
        run_id=run_id,
    )
    if out is not None:
        from sorter.traffic.recording import Writer

        if duration is None:
            raise SorterError("--out needs --duration (simulated seconds to write)")
        sim.record(
            Writer(out, {"simulated": True, "stations": stations, "rate": rate, "seed": seed}), duration_s=duration
        )
        where = str(out)
    else:
        from sorter.stream.kafka import ensure_topics
        from sorter.traffic.capture import stop_on_signals

        kafka = _kafka(config, bootstrap_servers, broker_wait)
        ensure_topics(kafka, {f"{topic_prefix}{s}": partitions for s in sim.stations})
        stop = threading.Event()
        stop_on_signals(stop)
        topics = ", ".join(topic_prefix + s for s in sim.stations)
        err_console.print(f"publishing to {kafka.bootstrap_servers} ({topics}); Ctrl-C stops")
        sim.publish(kafka, duration_s=duration, stop=stop)
        where = kafka.bootstrap_servers
    err_console.print(f"{sim.items_sent} items, {sim.frames_sent} frames -> {where} (run id {sim.run_id})")


def inspect(
    recording: Annotated[Path, typer.Argument(metavar="RECORDING", help="a .sorterrec file")],
    extract: Annotated[Path | None, typer.Option(help="write the frames as image files under this folder")] = None,
    limit: Annotated[int | None, typer.Option(help="extract at most this many frames")] = None,
    allow_damaged: Annotated[bool, typer.Option(help="exit 0 even if the file is damaged", metavar="")] = False,
    as_json: JsonOpt = False,
) -> None:
    """What a recording holds: stations, items, time span, rate, sizes; optionally its frames as images."""
    from sorter.traffic.recording import Reader
    from sorter.traffic.summary import summarize

    s = summarize(Reader.open(recording), extract_to=extract, limit=limit).as_dict()
    table = Table(title=str(recording), show_header=False)
    rows = [
        ("records", s["records"]),
        ("stations", ", ".join(f"{k} ({v})" for k, v in sorted(s["stations"].items()))),
        ("topics", ", ".join(f"{k} ({v})" for k, v in sorted(s["topics"].items()))),
        ("items", f"{s['items']} ({s['frames_per_item']} frames per item)"),
        ("time span", f"{s['span_s']} s, {s['rate_per_s']} frames/s"),
        ("frame bytes", "median {median}, min {min}, max {max}, total {total}".format(**s["value_bytes"])),
        ("file bytes", s["file_bytes"]),
        ("recorded by", json.dumps(s["meta"])),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console = Console(stderr=as_json)
    console.print(table)
    if extract is not None:
        console.print(f"frames written under {extract}")
    if as_json:
        print_json(s)
    if s["damage"]:
        if not allow_damaged:
            raise SorterError(s["damage"])
        console.print(f"[yellow]damaged:[/] {s['damage']}")


def diff(
    a: Annotated[
        Path | None,
        typer.Argument(metavar="[A]", help="commands of run A: JSON lines or a recording of the commands topic"),
    ] = None,
    b: Annotated[Path | None, typer.Argument(metavar="[B]", help="commands of run B")] = None,
    shadow: Annotated[
        bool,
        typer.Option(
            "--shadow",
            help="A: the commands topic, B: the shadow topic, read from the broker (settings: SORTER_KAFKA__*, "
            "SORTER_SHADOW__TOPIC, or --config)",
            metavar="",
        ),
    ] = False,
    config: Annotated[Path | None, typer.Option(help="--shadow: YAML settings file (also SORTER_CONFIG)")] = None,
    limit: Annotated[int, typer.Option(help="changed items to list")] = 20,
    fail_under: Annotated[float | None, typer.Option(help="exit 1 if chute agreement is below this (0-1)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare two runs' routing commands (or the live and the shadow model's): agreement, review shares, and
    the items that changed chute."""
    from sorter.traffic.diff import diff_commands, load_commands, load_topic

    if shadow:
        if a is not None or b is not None:
            raise SorterError("--shadow reads both sides from the broker: give no files with it")
        from sorter.settings import load_settings

        settings = load_settings(config)
        (ca, dup_a), (cb, dup_b) = (
            load_topic(settings.kafka, settings.kafka.commands_topic),
            load_topic(settings.kafka, settings.shadow.topic),
        )
        ca = {item: c for item, c in ca.items() if item in cb}  # the items the candidate was given (fraction)
        a, b = settings.kafka.commands_topic, settings.shadow.topic
    elif a is None or b is None:
        raise SorterError("give two command files (A and B), or --shadow")
    else:
        (ca, dup_a), (cb, dup_b) = load_commands(a), load_commands(b)
    d = diff_commands(ca, cb)
    d.duplicates_a, d.duplicates_b = dup_a, dup_b
    s = d.as_dict(limit=limit)
    console = Console(stderr=as_json)
    console.print(
        f"A {a} ({s['a_items']} items, model {', '.join(s['model_versions_a'])})  "
        f"B {b} ({s['b_items']} items, model {', '.join(s['model_versions_b'])})\n"
        f"common {s['common']}: same chute {s['chute_agreement']:.2%}, same label {s['label_agreement']:.2%}; "
        f"changed chute {s['changed']}; only in A {s['only_a']}, only in B {s['only_b']}; "
        f"duplicates A {dup_a}, B {dup_b}\n"
        f"sent to review (low confidence, unknown product), of the common items: A {s['review_share_a']:.2%}, "
        f"B {s['review_share_b']:.2%}"
    )
    if d.changed:
        table = Table(title=f"items that changed chute (first {min(limit, len(d.changed))})")
        for col in ("item", "station", "chute A -> B", "label A -> B", "confidence A / B"):
            table.add_column(col)
        for c in d.changed[:limit]:
            conf = " / ".join("-" if x is None else f"{x:.3f}" for x in c["confidence"])
            table.add_row(
                c["item_id"],
                str(c["station_id"]),
                " -> ".join(map(str, c["chute"])),
                " -> ".join(map(str, c["label"])),
                conf,
            )
        console.print(table)
    if as_json:
        print_json(s)
    if fail_under is not None and not d.common:
        err_console.print("no item in common to compare: --fail-under cannot pass on nothing", soft_wrap=True)
        raise typer.Exit(1)
    if fail_under is not None and d.chute_agreement < fail_under:
        why = f"chute agreement {100 * d.chute_agreement:.2f}% is below --fail-under {100 * fail_under:.2f}%"
        err_console.print(why, soft_wrap=True)
        raise typer.Exit(1)


EXAMPLES = {
    record: "sorter record --out line-3.sorterrec --duration 600",
    replay: "sorter replay line-3.sorterrec --speed 2 --topic-prefix staging.",
    simulate: "sorter simulate --stations 4 --rate 5 --frames-per-item 1-3 --duration 60",
    inspect: "sorter inspect line-3.sorterrec --extract frames/ --limit 20",
    diff: "sorter diff commands-a.jsonl commands-b.sorterrec --fail-under 0.99   |   sorter diff --shadow",
}


def register(app: typer.Typer, panel: str) -> None:
    for fn, command in EXAMPLES.items():
        app.command(fn.__name__, rich_help_panel=panel, epilog=example(command))(fn)
