"""One typed settings tree (pydantic-settings): environment (``SORTER_`` prefix, nested with ``__``),
an optional YAML file (``--config`` / ``SORTER_CONFIG``), then CLI flags, later ones winning.

    SORTER_KAFKA__BOOTSTRAP_SERVERS=broker:9092
    SORTER_KAFKA__CLIENT__SASL_MECHANISM=PLAIN        # any librdkafka property, passed through
    SORTER_REDIS__URL=rediss://:password@redis:6380/0
    SORTER_MODEL__CHECKPOINT=/models/model.pt
    SORTER_ROUTES=/config/routes.yaml

Secrets (the Redis URL, every pass-through client property) are ``SecretStr``: they never reach logs.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from sorter.errors import ConfigError
from sorter.limits import default_decode_threads

# SORTER_* variables read outside the settings tree: the config file, test failpoints, the demo's cache
# folder, and the test suite's own services.
OTHER_VARIABLES = {"SORTER_CONFIG", "SORTER_FAILPOINTS", "SORTER_CACHE"}
OTHER_PREFIXES = ("SORTER_TEST_", "SORTER_KAFKA__CLIENT__")
# Kubernetes service links: a Service named sorter or sorter-<x> in the namespace gives every pod
# SORTER[_<X>]_SERVICE_HOST, ..._PORT, ..._PORT_9400_TCP and the like (deploy/ turns them off, but other
# manifests may not). Only names whose ..._SERVICE_HOST is set count: SORTER_OBSERVE_PORT alone is a typo.
SERVICE_LINK = re.compile(
    r"^(SORTER(?:_[A-Z0-9_]+?)?)_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)$"
)


def _service_link(name: str, environ_upper: set[str]) -> bool:
    m = SERVICE_LINK.match(name)
    return m is not None and f"{m.group(1)}_SERVICE_HOST" in environ_upper


class Section(BaseModel):
    """A settings section: a misspelt key is an error naming it, not a silently ignored line."""

    model_config = ConfigDict(extra="forbid")


class KafkaSettings(Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "sorter"
    frames_pattern: str = Field(r"^frames\..+", description="regex of the camera-frame topics")
    topic_prefix: str = Field("frames.", description="frames.<station>: where a missing station id comes from")
    commands_topic: str = "sort.commands"
    dlq_topic: str = "frames.dlq"
    control_topic: str | None = Field(
        "sort.control", description="which model the fleet serves (control.py); none: not read"
    )
    session_timeout_ms: int = Field(10_000, ge=1_000)
    # The broker evicts a consumer that does not poll for this long. A batch that runs longer than a
    # third of it is finished while the loop keeps polling with its partitions paused (see worker.py).
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    fetch_wait_max_ms: int = Field(50, ge=1, le=1_000)
    fetch_stall_s: float = Field(
        30.0,
        ge=0,
        description="a partition with frames waiting on the broker that gives none for this long while the "
        "worker polls is reported (worker.fetch_stalled, sorter_stalled_partitions); 0: not watched",
    )
    fair_share: bool = Field(
        True,
        description="while behind, pause for a moment the partitions far less behind than the stalest one, so "
        "that librdkafka's shared prefetch queue does not starve a station (worker.fair_share)",
    )
    startup_timeout_s: float = Field(120.0, gt=0, description="wait this long for a broker at start-up")
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once", description="exactly-once: transactional consume -> produce (read_committed readers)"
    )
    metadata_refresh_ms: int = Field(5_000, ge=100, description="how soon a new station topic is seen")
    # cooperative-sticky spreads every partition of every station topic across the group (one partition per
    # station is common) and moves only the partitions that change owner; range gives partition i of every
    # topic to the same member, so single-partition stations would all land on one pod
    assignment_strategy: Literal["cooperative-sticky", "roundrobin", "range"] = "cooperative-sticky"
    message_timeout_ms: int = Field(
        30_000, ge=1_000, description="a delivery not acknowledged within this is re-sent (the batch waits)"
    )
    dlq_max_bytes: int = Field(
        900_000,
        ge=16_384,
        description="a dead letter larger than this goes without its payload (size and SHA-256 in headers); "
        "keep it under the producer's message.max.bytes (1,000,000) and the topic's max.message.bytes",
    )
    transactional_id: str | None = Field(
        None, description="exactly-once: stable per worker slot (default: group id + host name, a StatefulSet pod)"
    )
    transaction_timeout_ms: int = Field(
        15_000, ge=1_000, description="exactly-once: the broker aborts a transaction left open this long"
    )
    client: dict[str, SecretStr] = Field(default_factory=dict, description="librdkafka properties, passed through")

    @field_validator("frames_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        import re

        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from exc
        return value if value.startswith("^") else "^" + value  # librdkafka treats only ^... as a regex

    @model_validator(mode="after")
    def _poll_interval(self) -> KafkaSettings:
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError("max_poll_interval_ms must be >= session_timeout_ms (librdkafka refuses otherwise)")
        return self

    def client_config(self) -> dict[str, str]:
        return {k.replace("_", "."): v.get_secret_value() for k, v in self.client.items()}


class RedisSettings(Section):
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    enabled: bool = True
    ttl_s: int = Field(3_600, ge=1, description="how long an item's decision is remembered")
    key_prefix: str = "sorter:decision:"
    timeout_s: float = Field(0.25, gt=0)
    retry_after_s: float = Field(2.0, gt=0, description="wait before trying Redis again after a failure")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        from urllib.parse import urlsplit

        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme == "unix" and not parts.path):
            raise ValueError(
                "not a Redis URL: use redis://[:password@]host:port/db, rediss://... for TLS, or unix:///path"
            )
        return value

    pass_window_ms: int = Field(
        10_000,
        ge=0,
        description="frames of an item at the same station captured within this of its decision are one pass "
        "(no second command); a later pass or another station gets a command from the cached decision",
    )


class BatchSettings(Section):
    max_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: int = Field(20, ge=0, le=10_000, description="deadline to fill a batch at low traffic")
    latency_budget_ms: int = Field(
        0, ge=0, le=60_000, description="shorten the wait so wait + a full batch's measured model time fit (0: off)"
    )
    decode_threads: int = Field(default_factory=default_decode_threads, ge=1, description="default: the pod's CPUs")
    max_pixels: int = Field(40_000_000, ge=1)
    max_payload_bytes: int = Field(20_000_000, ge=1)
    overlap: bool = Field(True, description="decode and collect the next batch while the model runs this one")


class ModelSettings(Section):
    checkpoint: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool = Field(False, description="torch.compile the model at start-up (slower start, faster batches)")
    reload_poll_s: float = Field(
        2.0, ge=0, description="look for a new checkpoint at the path this often and serve it without a restart; 0: off"
    )


class ShadowSettings(Section):
    checkpoint: Path | None = Field(None, description="a candidate model deciding on the side (shadow.py); none: off")
    fraction: float = Field(1.0, gt=0, le=1, description="share of items the candidate decides (by item id)")
    topic: str = Field("sort.shadow", min_length=1, description="where its decisions go; never read by actuators")
    max_queued_batches: int = Field(4, ge=1, le=1000, description="batches waiting for it; more are skipped, counted")


class CanarySettings(Section):
    checkpoint: Path | None = Field(None, description="a candidate model deciding at canary.stations (canary.py)")
    stations: list[str] = Field(default_factory=list, description="where the candidate decides")
    window: int = Field(200, ge=10, le=100_000, description="items the candidate is judged on (the last ones)")
    min_agreement: float = Field(0.9, ge=0, le=1, description="chute agreement with the live model below: rollback")
    max_review_rate: float = Field(0.2, ge=0, le=1, description="share sent to review above: rollback")

    @model_validator(mode="after")
    def _both_or_neither(self) -> CanarySettings:
        if bool(self.checkpoint) != bool(self.stations):
            raise ValueError("a canary needs both a checkpoint and its stations (canary.checkpoint, canary.stations)")
        return self


class ObserveSettings(Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(9400, ge=0, le=65535, description="/metrics, /livez, /readyz; 0 picks a free port")
    liveness_timeout_s: float = Field(60.0, gt=0, description="/livez fails when the loop is stuck this long")
    stats_interval_ms: int = Field(5_000, ge=100, description="librdkafka statistics: lag, broker state")


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SORTER_", env_nested_delimiter="__", extra="forbid")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    observe: ObserveSettings = Field(default_factory=ObserveSettings)
    routes: Path | None = None
    strict_routes: bool = Field(False, description="routes naming no label or SKU of the model stop start-up")
    worker_id: str = Field(default_factory=_default_worker_id)
    shutdown_deadline_s: float = Field(20.0, gt=0, description="drain on SIGTERM within this; k8s grace period > it")
    log_level: str = "info"

    def redacted(self) -> dict[str, Any]:
        """Settings as logged at start-up: secrets masked, pass-through client property names only."""
        data = self.model_dump(mode="json")  # SecretStr dumps as '**********'
        data["kafka"]["client"] = sorted(self.kafka.client)
        return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def known_variables() -> set[str]:
    """Every SORTER_* variable the settings tree reads: each field, and each key of a section with ``__``
    (a section's own name takes the whole section as JSON, ``SORTER_KAFKA='{...}'``)."""
    names = set()
    for field, info in Settings.model_fields.items():
        names.add(f"SORTER_{field}".upper())
        if _is_section(info.annotation):
            names |= {f"SORTER_{field}__{sub}".upper() for sub in info.annotation.model_fields}
    return names


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def warn_unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """Warn about SORTER_* variables nothing reads (e.g. one underscore where two nest a section), naming
    the closest real one; returns them."""
    import difflib

    from sorter.logs import get_logger

    environ = os.environ if environ is None else environ
    known = known_variables()
    upper = {k.upper() for k in environ}
    unknown = [  # compared in upper case: pydantic-settings reads the variables case-insensitively
        k
        for k in environ
        if k.upper().startswith("SORTER_")
        and k.upper() not in known | OTHER_VARIABLES
        and not k.upper().startswith(OTHER_PREFIXES)
        and not _service_link(k.upper(), upper)
    ]
    for name in sorted(unknown):
        close = difflib.get_close_matches(name.upper(), sorted(known | OTHER_VARIABLES), n=1, cutoff=0.8)
        get_logger("sorter.settings").warning(
            "settings.unknown_variable", variable=name, did_you_mean=close[0] if close else None
        )
    return unknown


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """File < environment < explicit overrides (CLI flags). Invalid settings raise ConfigError naming the field."""
    warn_unknown_variables()
    config_file = config_file or (Path(os.environ["SORTER_CONFIG"]) if os.environ.get("SORTER_CONFIG") else None)
    file_data: dict[str, Any] = {}
    if config_file is not None:
        try:
            file_data = yaml.safe_load(config_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {config_file} cannot be read: {exc}") from exc
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of settings")
    try:
        from_env = Settings()
        env_set = from_env.model_dump(exclude_unset=True)
        explicit = {k: v for k, v in overrides.items() if v is not None}
        merged = _merge(_merge(file_data, _secrets_revealed(env_set)), explicit)
        return Settings.model_validate(merged) if merged else from_env
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(
            f"invalid settings ({problems}). Environment variables are SORTER_<SECTION>__<FIELD>."
        ) from exc
    except SettingsError as exc:  # a list or a section in the environment that is not JSON
        raise ConfigError(
            f"invalid settings ({exc}): a list or a section in the environment is JSON, e.g. "
            """SORTER_CANARY__STATIONS='["dock-2"]'"""
        ) from None


def _secrets_revealed(data: Any) -> Any:
    if isinstance(data, SecretStr):
        return data.get_secret_value()
    if isinstance(data, dict):
        return {k: _secrets_revealed(v) for k, v in data.items()}
    return data
