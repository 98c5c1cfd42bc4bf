"""Assembly: settings -> model, routing table, cache, decoder, pipeline, worker. Nothing else."""

from __future__ import annotations

from dataclasses import dataclass

from sorter.errors import ConfigError
from sorter.limits import check_memory
from sorter.logs import bound_context, get_logger
from sorter.model.checkpoint import Checkpoint, read_checkpoint
from sorter.model.int8 import check_int8
from sorter.model.runtime import make_runtime
from sorter.settings import Settings
from sorter.stream.cache import DecisionCache, MemoryCache, NoCache, RedisDecisionCache
from sorter.stream.canary import Canary
from sorter.stream.control import ControlReader
from sorter.stream.inference import Classifier
from sorter.stream.kafka import KafkaClients, ensure_topics, kafka_config, wait_for_broker
from sorter.stream.pipeline import Decoder, Pipeline
from sorter.stream.reload import Reloader, signature
from sorter.stream.routing import RoutingTable, check_routes, load_routing_table
from sorter.stream.shadow import Shadow, ShadowProducer, undelivered
from sorter.stream.worker import Worker

log = get_logger("sorter.app")


def build_cache(settings: Settings) -> DecisionCache:
    r = settings.redis
    if not r.enabled:
        return NoCache()
    return RedisDecisionCache(
        r.url.get_secret_value(),
        ttl_s=r.ttl_s,
        key_prefix=r.key_prefix,
        timeout_s=r.timeout_s,
        retry_after_s=r.retry_after_s,
    )


def _required_files(settings: Settings) -> None:
    if settings.routes is None:
        raise ConfigError("no routing table: pass --routes FILE or set SORTER_ROUTES (see README, 'Routing table')")
    if settings.model.checkpoint is None:
        raise ConfigError("no model: pass --checkpoint FILE or set SORTER_MODEL__CHECKPOINT")


@dataclass(frozen=True)
class Checked:
    """What :func:`preflight` read: the routing table and the checkpoint (verified), used as they are."""

    routes: RoutingTable
    checkpoint: Checkpoint  # the model is built from these bytes, not from a second read


def preflight(settings: Settings) -> Checked:
    """What can be wrong without loading the model or reaching the broker, checked first (loading takes
    seconds, minutes with compile; the broker wait up to startup_timeout_s): the files, the routing table,
    the checkpoint (read and verified, not built), the routes against its labels and SKUs, the device.
    The model is later built from the checkpoint read here: a file replaced meanwhile is not served
    with routes that were never checked against it."""
    _required_files(settings)
    checkpoint = read_checkpoint(settings.model.checkpoint)  # a missing file: one line, how to make it
    routes = load_routing_table(settings.routes)
    check_routes(routes, checkpoint.meta.classes, checkpoint.meta.skus, strict=settings.strict_routes)
    make_runtime(settings.model.device, settings.model.precision)
    check_int8(checkpoint, settings.model.checkpoint, settings.model.precision)
    return Checked(routes, checkpoint)


def build_pipeline(settings: Settings, checked: Checked | None = None) -> Pipeline:
    """Everything that can be wrong in the configuration fails here, at start-up, with a message
    (``checked``: what :func:`preflight` returned, when the caller ran it already)."""
    checked = checked if checked is not None else preflight(settings)
    routes = checked.routes
    m = settings.model
    model = Classifier(
        m.checkpoint,
        device=m.device,
        precision=m.precision,
        compile=m.compile,
        max_batch=settings.batch.max_size,
        read=checked.checkpoint,
    )
    del checked  # the state dict now lives in the model
    log.info(
        "model.loaded",
        model_version=model.model_version,
        backbone=model.meta.backbone,
        classes=model.meta.num_classes,
        device=str(model.runtime.device),
        precision=model.precision,
        compiled=model.buckets is not None,
        compile_s=round(model.compile_s, 1),
        # unknown-product detection: on with the checkpoint's threshold (and the table's switch), else off
        unknown_products=model.meta.ood.model_dump() if model.meta.ood else "off: the checkpoint has no threshold",
    )
    b = settings.batch
    return Pipeline(
        model,
        routes,
        build_cache(settings),
        Decoder(b.decode_threads, b.max_pixels),
        worker_id=settings.worker_id,
        topic_prefix=settings.kafka.topic_prefix,
        max_payload_bytes=b.max_payload_bytes,
        pass_window_ms=settings.redis.pass_window_ms,
    )


def build_worker(settings: Settings, *, create_topics: bool = True, **kwargs) -> Worker:
    with bound_context(worker_id=settings.worker_id):  # start-up lines carry the worker's id too
        return _build_worker(settings, create_topics=create_topics, **kwargs)


def _check_port(settings: Settings) -> None:
    """The metrics port, checked before the model loads (minutes with compile): two workers on one host
    must not find out after loading that the second cannot serve /metrics and the probes."""
    import socket

    from sorter.stream.observe import port_taken

    o = settings.observe
    if not o.enabled or o.port == 0:
        return
    with socket.socket() as s:
        # as the server binds: connections of a previous process in TIME_WAIT (a container restarted in
        # its pod) do not make the port taken
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((o.host, o.port))
        except OSError as exc:
            raise port_taken(o.host, o.port, exc) from None


def _build_worker(settings: Settings, *, create_topics: bool = True, **kwargs) -> Worker:
    # what can be checked without the model first: loading it takes seconds (minutes with --compile)
    _check_port(settings)
    serving = signature(settings.model.checkpoint) if settings.model.checkpoint else None  # before it is read
    checked = preflight(settings)
    candidate = read_checkpoint(settings.shadow.checkpoint) if settings.shadow.checkpoint else None  # one line
    canary = read_checkpoint(settings.canary.checkpoint) if settings.canary.checkpoint else None
    if candidate is not None and canary is not None:
        raise ConfigError(
            "shadow.checkpoint and canary.checkpoint are both set: a canary's shadow is the live model (its "
            "baseline); run one of them at a time"
        )
    for read, path in ((candidate, settings.shadow.checkpoint), (canary, settings.canary.checkpoint)):
        if read is not None:  # checked as the live model is, before the broker wait and the model loads
            check_shadow_topic(settings)
            check_routes(checked.routes, read.meta.classes, read.meta.skus, strict=settings.strict_routes)
            check_int8(read, path, settings.model.precision)
    wait_for_broker(settings.kafka, settings.kafka.startup_timeout_s)
    live = checked.checkpoint if canary is not None else None  # a canary's baseline: the very bytes that serve
    pipeline = build_pipeline(settings, checked)
    del checked
    memory = check_memory(settings)  # with the model loaded: what is left must hold the frames in flight
    log.info("worker.limits", decode_threads=settings.batch.decode_threads, **memory)
    k = settings.kafka
    if create_topics:
        control = {k.control_topic: 1} if k.control_topic else {}  # one partition: requests in order
        # the control topic's last request is what a new pod serves: kept forever (a few bytes each)
        forever = {k.control_topic: {"retention.ms": "-1", "retention.bytes": "-1"}} if k.control_topic else {}
        shadow = {settings.shadow.topic: 1} if candidate is not None or canary is not None else {}
        ensure_topics(k, {k.commands_topic: 1, k.dlq_topic: 1} | control | shadow, configs=forever)
    log.info("worker.config", settings=settings.redacted())
    worker = Worker(settings, pipeline, **kwargs)
    worker.metrics.set_model(pipeline.model)
    clients = kwargs.get("clients") or KafkaClients()
    if candidate is not None:
        worker.shadow = build_shadow(settings, pipeline, candidate, worker.metrics, clients)
    if canary is not None:
        worker.shadow = build_canary(settings, pipeline, canary, live, worker.metrics, clients)
        del live
    if settings.model.reload_poll_s > 0 or k.control_topic:
        worker.reloader = build_reloader(settings, pipeline, worker.metrics, serving)
    if k.control_topic:
        config = kafka_config(k, required={"group.id": f"{k.group_id}.control", "enable.auto.commit": False,
                                                   "enable.partition.eof": True})  # fmt: skip
        worker.control = ControlReader(clients.consumer(config), k.control_topic)
    return worker


def build_shadow(settings: Settings, pipeline: Pipeline, read: Checkpoint, metrics, clients: KafkaClients) -> Shadow:
    """The candidate model beside the live one (shadow.py): built as the live model is, checked against the same
    routing table, its own pipeline (the live table, an in-process cache, its own decoder) and topic."""
    model = _candidate(settings, settings.shadow.checkpoint, read)
    log.info("shadow.loaded", candidate=model.model_version, live=pipeline.model.model_version,
             topic=settings.shadow.topic, fraction=settings.shadow.fraction, backbone=model.meta.backbone,
             precision=model.precision)  # fmt: skip
    if model.model_version == pipeline.model.model_version:
        log.warning("shadow.same_version", model_version=model.model_version, why="the candidate is the live model")
    return _on_the_side(settings, pipeline, model, metrics, clients, fraction=settings.shadow.fraction)


def build_canary(
    settings: Settings, pipeline: Pipeline, read: Checkpoint, live: Checkpoint, metrics, clients: KafkaClients
) -> Shadow:
    """A candidate deciding at ``canary.stations`` (canary.py), and the live model's second copy (built from
    ``live``, the checkpoint the live model was built from) deciding their items on the side (its baseline):
    that shadow is returned, the canary set on the pipeline."""
    c = settings.canary
    model = _candidate(settings, c.checkpoint, read)
    if model.input_size != pipeline.model.input_size:
        raise ConfigError(
            f"canary.checkpoint {c.checkpoint} takes {model.input_size} px photos and the live model "
            f"{pipeline.model.input_size} px: a canary needs the live model's input size (a frame is decoded once)"
        )
    if model.model_version == pipeline.model.model_version:
        raise ConfigError(
            f"canary.checkpoint {c.checkpoint} holds the live model's version {model.model_version}: a canary "
            "must be another model (its decisions are told apart by their model_version)"
        )
    baseline = _candidate(settings, settings.model.checkpoint, live)
    canary = Canary(model, c.stations, window=c.window, min_agreement=c.min_agreement,
                    max_review_rate=c.max_review_rate, metrics=metrics)  # fmt: skip
    pipeline.canary = canary
    return _on_the_side(settings, pipeline, baseline, metrics, clients, stations=canary.stations,
                        on_compared=canary.compared)  # fmt: skip


def check_shadow_topic(settings: Settings) -> None:
    """The shadow topic must be none of sorter's other topics, nor one the frames pattern reads."""
    import re

    k, topic = settings.kafka, settings.shadow.topic
    clash = {k.commands_topic: "the commands topic (actuators obey it)", k.dlq_topic: "the dead-letter topic",
             k.control_topic: "the control topic"}.get(topic)  # fmt: skip
    if clash is None and re.search(k.frames_pattern, topic):
        clash = f"a frames topic (it matches kafka.frames_pattern {k.frames_pattern}: the worker would read it)"
    if clash is not None:
        raise ConfigError(f"shadow.topic {topic} is {clash}: set SORTER_SHADOW__TOPIC to a topic of its own")


def _candidate(settings: Settings, path, read: Checkpoint) -> Classifier:
    m = settings.model
    return Classifier(path, device=m.device, precision=m.precision, compile=m.compile,
                      max_batch=settings.batch.max_size, read=read)  # fmt: skip


def _on_the_side(settings: Settings, pipeline: Pipeline, model, metrics, clients: KafkaClients, **kw) -> Shadow:
    """``model`` deciding on the side (shadow.py): its own pipeline (the live routing table, an in-process cache,
    its own decoder) and the shadow topic."""
    b, k, sh = settings.batch, settings.kafka, settings.shadow
    side = Pipeline(
        model,
        pipeline.routes,
        MemoryCache(max_items=50_000),  # never the live cache: decisions on the side are not orders
        Decoder(max(1, b.decode_threads // 2), b.max_pixels),
        worker_id=settings.worker_id,
        topic_prefix=k.topic_prefix,
        max_payload_bytes=b.max_payload_bytes,
        pass_window_ms=settings.redis.pass_window_ms,
    )
    side.judge_late = False  # it decides what the live side decided, however old (late items are left out)
    config = kafka_config(k, {"linger.ms": 5, "enable.idempotence": True, "acks": "all"})
    producer = ShadowProducer(clients.producer, config, undelivered(metrics))
    return Shadow(side, producer, sh.topic, metrics, max_queued_batches=sh.max_queued_batches,
                  topic_prefix=k.topic_prefix, **kw)  # fmt: skip


def build_reloader(settings: Settings, pipeline: Pipeline, metrics, serving: tuple | None = None) -> Reloader:
    """Hot reload of ``--checkpoint`` (reload.py): built as at start-up, checked against what serves."""
    m = settings.model

    def load(path):
        return Classifier(path, device=m.device, precision=m.precision, compile=m.compile,
                          max_batch=settings.batch.max_size)  # fmt: skip

    def check(model) -> None:
        serving = pipeline.model
        if model.input_size != serving.input_size:
            raise ConfigError(
                f"its input size is {model.input_size} px and the model serving takes {serving.input_size} px: "
                "a new input size needs a restart (the photos in flight are decoded for the old one)"
            )
        check_routes(pipeline.routes, model.meta.classes, model.meta.skus, strict=settings.strict_routes)

    return Reloader(
        m.checkpoint, load, check, poll_s=m.reload_poll_s, on_refused=lambda _: metrics.reloads.labels("refused").inc(),
        serving=serving, watch=m.reload_poll_s > 0,
    )  # fmt: skip
