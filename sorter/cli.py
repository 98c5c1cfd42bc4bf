"""The ``sorter`` command line (typer): thin wrappers that parse flags and call the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sorter.cli_options import JsonOpt, example, print_json
from sorter.errors import ConfigError, SorterError
from sorter.logs import configure_logging, report_failure

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="sorter: classify conveyor photos and route items to chutes.",
)
out_console = Console()

# `sorter --help` groups the commands by what a user came to do
MODEL, STREAM, TRAFFIC, MEASURE = "Model", "Stream", "Traffic", "Measure"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out_console.print(f"sorter {version('sorter')}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error (default: SORTER_LOG_LEVEL, else info)")
    ] = None,
    log_format: Annotated[str, typer.Option(help="json (one event per line) or console (for a terminal)")] = "json",
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="print the version and exit", is_eager=True, callback=_print_version, metavar=""
        ),
    ] = False,
) -> None:
    global _LOG_LEVEL_FLAG
    _LOG_LEVEL_FLAG = log_level
    configure_logging(log_level or "info", log_format)  # unknown value: ConfigError, one line from main(), exit 2


_LOG_LEVEL_FLAG: str | None = None  # `sorter --log-level X run` wins over SORTER_LOG_LEVEL and the config file


@app.command(rich_help_panel=MODEL, epilog=example("sorter synth data --classes 8 --per-class 60 --test-per-class 20"))
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="folder to write the ImageFolder tree into")],
    classes: Annotated[int, typer.Option(help="number of product classes")] = 10,
    per_class: Annotated[int, typer.Option(help="photos per class")] = 60,
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
    width: Annotated[int, typer.Option(help="photo width in pixels")] = 640,
    height: Annotated[int, typer.Option(help="photo height in pixels")] = 480,
    val_per_class: Annotated[
        int,
        typer.Option(
            help="also write OUT/val with this many photos per class (different seed); photos then go to OUT/train"
        ),
    ] = 0,
    test_per_class: Annotated[
        int, typer.Option(help="also write OUT/test (held out) with this many photos per class (another seed)")
    ] = 0,
    hard: Annotated[
        bool,
        typer.Option(
            "--hard",
            metavar="",
            help="fine-grained product families (same shape and colour, different print), several poses, "
            "neighbouring parcels, clutter and glare: a catalogue that ranks training recipes",
        ),
    ] = False,
) -> None:
    """Generate synthetic conveyor photos of products (ImageFolder layout, plus skus.json)."""
    from sorter.data.synth import catalog, write_dataset
    from sorter.errors import ConfigError
    from sorter.progress import progress_bar

    try:
        catalog(classes, hard)
    except ValueError as exc:
        raise ConfigError(f"--classes {classes}: {exc}") from None

    splits = [(out_dir, per_class, seed)]
    if val_per_class or test_per_class:
        splits = [(out_dir / "train", per_class, seed)]
        splits += [(out_dir / "val", val_per_class, seed + 1_000_003)] if val_per_class else []
        splits += [(out_dir / "test", test_per_class, seed + 2_000_003)] if test_per_class else []
    total = sum(n for _, n, _ in splits) * classes
    with progress_bar(total, "rendering photos") as advance:
        for folder, n, s in splits:
            write_dataset(folder, classes, n, seed=s, size=(width, height), progress=advance, hard=hard)
    if val_per_class or test_per_class:
        (out_dir / "skus.json").write_text((out_dir / "train" / "skus.json").read_text())
    out_console.print(f"wrote {total} photos of {classes} products to {out_dir}")


@app.command(rich_help_panel=MODEL, epilog=example("sorter train data --out model.pt --backbone mobilenet_v2"))
def train(
    data_dir: Annotated[
        Path, typer.Argument(metavar="DATA", help="ImageFolder tree (DATA/<label>/*.jpg, or DATA/train + DATA/val)")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint file to write")],
    backbone: Annotated[str, typer.Option(help="resnet18 or mobilenet_v2")] = "resnet18",
    epochs: Annotated[
        int | None, typer.Option(help="total epochs over both phases (default: from the dataset size)")
    ] = None,
    head_epochs: Annotated[int | None, typer.Option(help="phase-1 epochs (frozen backbone); default 15%")] = None,
    image_size: Annotated[int, typer.Option(help="square model input, pixels")] = 224,
    batch_size: Annotated[int, typer.Option()] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16")] = "auto",
    pretrained: Annotated[
        bool,
        typer.Option("--pretrained/--no-pretrained", help="start from ImageNet weights (found offline)", metavar=""),
    ] = True,
    weights: Annotated[Path | None, typer.Option(help="ImageNet weights file for the backbone")] = None,
    attention: Annotated[
        bool, typer.Option("--attention/--no-attention", help="spatial attention head", metavar="")
    ] = True,
    pool: Annotated[str, typer.Option(help="attention (A-weighted mean of X) or mean (mean of A*X)")] = "attention",
    augment: Annotated[
        str, typer.Option(help="none, light, light-erase, belt or belt-any-angle (see README)")
    ] = "light",
    mix: Annotated[
        str, typer.Option(help="batch mixing: auto (both on runs of 1,000+ steps), none, cutmix, mixup, both")
    ] = "auto",
    ema: Annotated[float, typer.Option(help="weight EMA decay per step; 0 turns it off")] = 0.995,
    seed: Annotated[int, typer.Option()] = 0,
    patience: Annotated[int, typer.Option(help="early-stopping patience, epochs")] = 3,
    val_fraction: Annotated[
        float, typer.Option(help="validation + calibration share (half each) when DATA has no val/")
    ] = 0.2,
    test_fraction: Annotated[
        float, typer.Option(help="held-out test share of a flat DATA (DATA/test is used when present); 0: none")
    ] = 0.1,
    workers: Annotated[int, typer.Option(help="data-loader worker processes")] = 0,
    model_version: Annotated[str | None, typer.Option(help="version string stamped on routing commands")] = None,
    ood_score: Annotated[str, typer.Option(help="unknown-product score: energy, max_logit or msp")] = "energy",
    ood_false_review: Annotated[
        float, typer.Option(help="share of known products the unknown-product threshold may send to review")
    ] = 0.02,
) -> None:
    """Train the attention classifier in two phases (frozen backbone, then fine-tuning)."""
    from sorter.train.trainer import TrainConfig
    from sorter.train.trainer import train as run_training

    config = TrainConfig(
        backbone=backbone,
        epochs=epochs,
        head_epochs=head_epochs,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        precision=precision,
        pretrained=pretrained,
        weights=weights,
        attention=attention,
        pool=pool,
        augment=augment,
        mix=mix,
        ema=ema,
        seed=seed,
        patience=patience,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        num_workers=workers,
        model_version=model_version,
        ood_score=ood_score,
        ood_false_review=ood_false_review,
    )
    result = run_training(data_dir, out, config)
    e = result.test or result.evaluation
    split = "held-out test" if result.test else "validation (no test split)"
    out_console.print(
        f"[bold]{out}[/]: {split} accuracy {e.accuracy:.3f}, macro-F1 {e.macro_f1:.3f}, ECE {e.ece:.3f} "
        f"({result.seconds:.0f} s); curves in {out.with_suffix('')}.curves.png"
    )


@app.command(rich_help_panel=MODEL, epilog=example("sorter evaluate data --checkpoint model.pt --json"))
def evaluate(
    data_dir: Annotated[
        Path, typer.Argument(metavar="DATA", help="ImageFolder tree; test/ or val/ inside it is used if present")
    ],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c")],
    as_json: JsonOpt = False,
    confusion: Annotated[
        Path | None, typer.Option(help="confusion-matrix PNG (default: next to the checkpoint)")
    ] = None,
    device: Annotated[str, typer.Option()] = "auto",
    precision: Annotated[str, typer.Option()] = "auto",
    include_seen: Annotated[
        bool, typer.Option(help="also score photos that trained or tuned the model (optimistic)", metavar="")
    ] = False,
    target_error: Annotated[float, typer.Option(help="error among routed items to suggest min_confidence for")] = 0.005,
    unknown: Annotated[
        Path | None, typer.Option(help="photos of products the model was not trained on: how many go to review")
    ] = None,
) -> None:
    """Accuracy, per-class scores, calibration (ECE), confusion matrix and risk-coverage curve, on unseen photos.

    The risk-coverage curve is the share sent to review against the error among routed items, per
    confidence threshold; the suggested min_confidence meets --target-error."""
    from sorter.train.evaluate import evaluate_folder
    from sorter.train.metrics import risk_coverage
    from sorter.train.plots import plot_confusion, plot_risk_coverage

    score = evaluate_folder(
        data_dir, checkpoint, device=device, precision=precision, include_seen=include_seen, unknown=unknown
    )
    evaluation, classes, root = score.evaluation, score.classes, score.root
    png = confusion or checkpoint.with_suffix("").with_name(checkpoint.stem + ".confusion.png")
    plot_confusion(evaluation.confusion, classes, png, title=f"{checkpoint.name} on {root}")
    rc = risk_coverage(score.probs, score.labels, target_error)
    rc_png = png.with_name(checkpoint.stem + ".risk-coverage.png")
    plot_risk_coverage(rc, rc_png, title=f"{checkpoint.name} on {root} ({evaluation.n} photos)")
    rc_png.with_suffix(".json").write_text(json.dumps(rc, indent=1) + "\n")
    table = Table(title=f"{checkpoint.name} on {root} ({evaluation.n} photos)")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in evaluation.per_class:
        table.add_row(c.label, f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}", str(c.support))
    console = Console(stderr=as_json)  # keep stdout for the JSON line when asked
    console.print(table)
    if score.skipped_seen:
        console.print(f"{score.skipped_seen} photos of {root} left out: they trained or tuned this model")
    console.print(
        f"accuracy {evaluation.accuracy:.4f}  macro-F1 {evaluation.macro_f1:.4f}  "
        f"ECE {evaluation.ece:.4f}  ({score.precision})  confusion matrix: {png}"
    )
    s = rc["suggested_min_confidence"]
    console.print(
        f"for at most {100 * target_error:.1f}% errors among routed items: min_confidence {s['threshold']:.2f} "
        f"sends {100 * s['review_share']:.1f}% to review" if s else
        f"no confidence threshold keeps routed errors under {100 * target_error:.1f}%",
    )  # fmt: skip
    console.print(f"risk-coverage: {rc_png} (and .json)")
    if score.unknown is not None:
        console.print(_unknown_line(score.unknown))
    if as_json:
        summary = evaluation.summary() | {"confusion_png": str(png), "skipped_seen": score.skipped_seen}
        summary |= {"precision": score.precision}
        summary |= {"suggested_min_confidence": s, "risk_coverage_png": str(rc_png)}
        summary |= {"unknown": score.unknown} if score.unknown is not None else {}
        print_json(summary)


def _unknown_line(u: dict) -> str:
    aurocs = ", ".join(f"{name} {v:.3f}" for name, v in u["auroc"].items())
    line = f"unknown products ({u['unknown_photos']} photos against {u['known_photos']} known): AUROC {aurocs}"
    f = u.get("fitted")
    if f is None:
        return line + "; this checkpoint has no fitted threshold (trained before unknown-product detection)"
    return line + (
        f"; at the checkpoint's threshold ({f['score']} > {f['threshold']:.3f}, fitted on {f['photos']} "
        f"{f['fitted_on']} photos for {100 * f['false_review']:g}% false review): "
        f"{100 * f['unknown_caught']:.1f}% of unknown photos to review, {100 * f['known_reviewed']:.1f}% of known"
    )


@app.command(rich_help_panel=MODEL, epilog=example("sorter quantize model.pt data --out model.int8.pt"))
def quantize(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="a trained checkpoint")],
    data_dir: Annotated[
        Path, typer.Argument(metavar="DATA", help="its ImageFolder tree: train/ calibrates, test/ checks")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="checkpoint to write, with the int8 model inside")],
    photos: Annotated[int, typer.Option(help="calibration photos drawn from DATA/train")] = 300,
    max_drop: Annotated[
        float, typer.Option(help="accuracy points int8 may lose on DATA/test; more refuses to write")
    ] = 0.5,
    include_seen: Annotated[
        bool, typer.Option(help="also score photos that trained or tuned the model (optimistic)", metavar="")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """An int8 copy of the model for CPUs (OpenVINO), calibrated on its training photos and checked on
    held-out ones; the worker serves it with --precision int8, or with auto where it measures faster."""
    from sorter.train.quantize import QuantizeConfig, quantize_checkpoint

    cfg = QuantizeConfig(photos=photos, max_drop=max_drop / 100, include_seen=include_seen)
    report = quantize_checkpoint(checkpoint, data_dir, out, cfg)
    console = Console(stderr=as_json)
    console.print(
        f"int8 {report['int8_accuracy']:.4f} vs fp32 {report['fp32_accuracy']:.4f} on {report['scored_photos']} "
        f"photos of {report['scored_root']} (drop {100 * report['drop']:.2f} points, {100 * report['agreement']:.1f}% "
        f"same label); written: {out}"
    )
    if as_json:
        print_json(report | {"out": str(out)})


@app.command(
    rich_help_panel=MODEL, epilog=example("sorter explain photo.jpg --checkpoint model.pt --out attention.png")
)
def explain(
    image: Annotated[Path, typer.Argument(metavar="PHOTO", help="a photo (JPEG, PNG, WebP, ...)")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")],
    top_k: Annotated[int, typer.Option(help="how many predictions to show")] = 5,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Draw the model's spatial attention over a photo, with its top-k predictions."""
    from sorter.errors import ConfigError
    from sorter.train.explain import explain_image

    if not image.is_file():
        raise ConfigError(f"{image}: no such photo")
    result = explain_image(image, checkpoint, out, top_k=top_k, device=device)
    for label, sku, p in result.top:
        out_console.print(f"{p:7.3f}  {label}  ({sku})")
    out_console.print(f"attention map: {out}")


@app.command(rich_help_panel=STREAM, epilog=example("sorter --log-format console demo --duration 60"))
def demo(
    duration: Annotated[float, typer.Option(help="seconds to run; Ctrl-C stops earlier")] = 30.0,
    stations: Annotated[int, typer.Option(help="simulated conveyor stations")] = 3,
    rate: Annotated[float, typer.Option(help="items per second per station")] = 4.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    fresh: Annotated[bool, typer.Option(help="retrain the cached demo model", metavar="")] = False,
) -> None:
    """The embedded default: local broker + Redis, simulated stations, the worker and a live view."""
    import shutil

    from sorter.demo import demo_files, run_streaming_demo

    if fresh:
        shutil.rmtree(demo_files().root, ignore_errors=True)
    run_streaming_demo(duration, stations, rate, device)


@app.command("demo-model", rich_help_panel=MODEL, epilog=example("sorter demo-model"))
def demo_model(
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
) -> None:
    """Train (once, cached) and evaluate the demo model on unseen synthetic photos, with pictures."""
    from sorter.demo import show_demo_model

    r = show_demo_model(device)
    e = r.evaluation
    out_console.print(
        f"\n[bold]demo model[/] {r.checkpoint}\n"
        f"  unseen photos: {e.n}, accuracy {e.accuracy:.3f}, macro-F1 {e.macro_f1:.3f}, ECE {e.ece:.3f}\n"
        f"  {r.photo.name} -> {r.label} ({r.sku}) with confidence {r.confidence:.3f}\n"
        f"  pictures: {', '.join(str(p) for p in r.pictures)}"
    )


@app.command(
    rich_help_panel=STREAM,
    epilog=example("sorter run --config sorter.yaml --checkpoint model.pt --routes routes.yaml"),
)
def run(
    config: Annotated[Path | None, typer.Option(help="YAML settings file (also SORTER_CONFIG)")] = None,
    bootstrap_servers: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers (SORTER_KAFKA__BOOTSTRAP_SERVERS)")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="redis://[:password@]host:port/db, rediss:// for TLS (SORTER_REDIS__URL)")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="model checkpoint (SORTER_MODEL__CHECKPOINT)")] = None,
    routes: Annotated[Path | None, typer.Option(help="routing table, YAML or JSON (SORTER_ROUTES)")] = None,
    shadow_checkpoint: Annotated[
        Path | None,
        typer.Option(help="a candidate model deciding on the side, to sort.shadow (SORTER_SHADOW__CHECKPOINT)"),
    ] = None,
    group_id: Annotated[str | None, typer.Option(help="consumer group (SORTER_KAFKA__GROUP_ID)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (SORTER_MODEL__DEVICE)")] = None,
    delivery: Annotated[
        str | None, typer.Option(help="at-least-once (default) or exactly-once (SORTER_KAFKA__DELIVERY)")
    ] = None,
    max_frames: Annotated[int | None, typer.Option(help="stop after this many frames (replays, tests)")] = None,
    idle_exit: Annotated[float | None, typer.Option(help="stop after this many idle seconds")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="/metrics, /livez, /readyz port (0: any free one, logged in observe.listening; SORTER_OBSERVE__PORT)"
        ),
    ] = None,
    strict_routes: Annotated[
        bool | None,
        typer.Option(
            "--strict-routes",
            help="routes naming no label/SKU of the model stop start-up (SORTER_STRICT_ROUTES)",
            metavar="",
        ),
    ] = None,
) -> None:
    """Run the streaming worker: camera frames in, routing commands out."""
    from sorter.settings import load_settings
    from sorter.stream.app import build_worker

    kafka = {
        k: v
        for k, v in {"bootstrap_servers": bootstrap_servers, "group_id": group_id, "delivery": delivery}.items()
        if v
    }
    settings = load_settings(
        config,
        kafka=kafka or None,
        redis={"url": redis_url} if redis_url else None,
        model={k: v for k, v in {"checkpoint": checkpoint, "device": device}.items() if v} or None,
        observe={"port": metrics_port} if metrics_port is not None else None,
        shadow={"checkpoint": shadow_checkpoint} if shadow_checkpoint else None,
        routes=routes,
        strict_routes=strict_routes,
    )
    configure_logging(_LOG_LEVEL_FLAG or settings.log_level)
    worker = build_worker(settings)
    worker.install_signal_handlers()
    worker.run(max_frames=max_frames, idle_exit_s=idle_exit)


@app.command("dev-services", rich_help_panel=STREAM, epilog=example("sorter dev-services"))
def dev_services() -> None:
    """Start a local Kafka-compatible broker and Redis, print how to point `sorter run` at them; Ctrl-C stops."""
    import signal as _signal
    import threading

    from sorter.services import redis_server, tansu_broker

    broker, redis_ = tansu_broker().start(), redis_server().start()
    out_console.print(
        f"broker 127.0.0.1:{broker.port}  redis 127.0.0.1:{redis_.port}\n"
        f"  export SORTER_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:{broker.port}\n"
        f"  export SORTER_REDIS__URL=redis://127.0.0.1:{redis_.port}/0\n"
        f"  sorter run --checkpoint MODEL.pt --routes ROUTES.yaml\n"
        f"(memory only: everything is gone when this stops; Ctrl-C to stop)"
    )
    stop = threading.Event()
    _signal.signal(_signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
        redis_.stop()


@app.command(
    rich_help_panel=MEASURE, epilog=example("sorter bench --backbone mobilenet_v2 --image-size 160 --frames 300")
)
def bench(
    backbone: Annotated[str, typer.Option(help="resnet18 or mobilenet_v2")] = "resnet18",
    image_size: Annotated[int, typer.Option(help="model input size")] = 224,
    frames: Annotated[int, typer.Option(help="frames per measurement")] = 600,
    checkpoint: Annotated[Path | None, typer.Option(help="a real checkpoint (default: random weights)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto, fp32, bf16, fp16, int8 (OpenVINO, calibrated on the bench photos)")
    ] = "auto",
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch.compile the model", metavar="")
    ] = False,
    overlap: Annotated[
        bool, typer.Option("--overlap/--no-overlap", help="decode next batch during this one", metavar="")
    ] = True,
    delivery: Annotated[str, typer.Option(help="at-least-once or exactly-once")] = "at-least-once",
    batch_sizes: Annotated[str, typer.Option(help="batch sizes the ceiling tries, comma-separated")] = "8,16,32",
    naive_frames: Annotated[int, typer.Option(help="frames for the (slow) naive loop and Quix application")] = 100,
    quix_python: Annotated[
        Path | None, typer.Option(help="python of a venv with the bench-quix extra: adds the Quix Streams stage")
    ] = None,
    paced_seconds: Annotated[float, typer.Option(help="length of the 70% paced run (600: memory soak)")] = 20.0,
    max_wait_ms: Annotated[
        int | None, typer.Option(help="the worker's batch.max_wait_ms (default: the setting's default)")
    ] = None,
    latency_budget_ms: Annotated[int, typer.Option(help="the worker's batch.latency_budget_ms (0: off)")] = 0,
    paced_fraction: Annotated[
        float, typer.Option(help="the paced run's rate, as a share of the end-to-end rate", min=0.01, max=1.0)
    ] = 0.7,
    decode_threads: Annotated[int | None, typer.Option(help="decode pool size (default: cores, max 8)")] = None,
    bootstrap_servers: Annotated[str | None, typer.Option(help="use this broker (default: start Tansu)")] = None,
    redis_url: Annotated[str | None, typer.Option(help="use this Redis (default: start one)")] = None,
    out: Annotated[Path, typer.Option(help="folder for the JSON and the plot")] = Path("benchmarks/results"),
    as_json: JsonOpt = False,
) -> None:
    """Ceiling vs end to end vs naive loop vs broker alone, latency at 70% load, and a plot."""
    from sorter.bench import BenchConfig, run, save, summary_lines

    cfg = BenchConfig(
        backbone=backbone,
        image_size=image_size,
        frames=frames,
        checkpoint=checkpoint,
        device=device,
        precision=precision,
        compile=compile,
        overlap=overlap,
        delivery=delivery,
        batch_sizes=tuple(int(b) for b in batch_sizes.split(",")),
        naive_frames=naive_frames,
        quix_python=quix_python,
        paced_seconds=paced_seconds,
        max_wait_ms=max_wait_ms,
        latency_budget_ms=latency_budget_ms,
        paced_fraction=paced_fraction,
        decode_threads=decode_threads,
        bootstrap=bootstrap_servers,
        redis_url=redis_url,
    )
    result = run(cfg)
    png, data = save(result, cfg, out)
    console = Console(stderr=as_json)
    for line in summary_lines(result):
        console.print(line)
    console.print(f"plot: {png}, data: {data}")
    if as_json:
        print_json(result)


@app.command(
    rich_help_panel=MEASURE,
    epilog=example("sorter capacity --stations 12 --items-per-s 2 --cameras 4 --budget-ms 300"),
)
def capacity(
    stations: Annotated[int, typer.Option(help="stations on the line", min=1)] = 12,
    items_per_s: Annotated[float, typer.Option(help="items per second at each station", min=0.01)] = 2.0,
    cameras: Annotated[int, typer.Option(help="photos per item (cameras in the tunnel)", min=1)] = 4,
    budget_ms: Annotated[float, typer.Option(help="p99 captured-at to command delivered", min=1)] = 300.0,
    results: Annotated[Path, typer.Option(help="folder of sorter bench results")] = Path("benchmarks/results"),
    out: Annotated[Path, typer.Option(help="the plot")] = Path("benchmarks/results/capacity.png"),
    as_json: JsonOpt = False,
) -> None:
    """What to buy: frames/s per pod within a latency budget, per measured machine, and pods for a line."""
    from sorter.bench.capacity import Line, measured, plan, plot, table

    line = Line(stations, items_per_s, cameras)
    points = measured(results)
    if not points:
        raise ConfigError(f"no sorter bench results with a paced run under {results}: run sorter bench first")
    rows = plan(points, line, budget_ms)
    console = Console(stderr=as_json)
    for text in table(rows, line, budget_ms):
        console.print(text, markup=False, soft_wrap=True)
    console.print(f"plot: {plot(rows, line, budget_ms, out)}")
    if as_json:
        print_json({"line": str(line), "frames_per_s": line.frames_per_s, "budget_ms": budget_ms, "rows": rows})


def _register_traffic() -> None:
    from sorter.traffic.cli import register

    register(app, TRAFFIC)


_register_traffic()


def main() -> None:
    try:
        app()
    except SorterError as exc:
        report_failure(str(exc))  # one line, read by people and by log pipelines
        sys.exit(2)
