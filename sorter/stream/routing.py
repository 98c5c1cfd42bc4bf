"""The routing policy: a prediction -> a chute, and why. A pure function over a routing table.

Routing table (YAML or JSON)::

    default_chute: "C-99"        # classified, but its SKU/label has no route of its own
    review_chute: "REVIEW"       # the model is not sure: a person looks
    min_confidence: 0.80         # below this (calibrated) confidence -> review_chute
    routes:                      # SKU id or class label -> chute (a SKU match wins over a label match)
      SKU-100000: "C-01"
      bottle-yellow-dots: "C-02"
    stations:                    # per-station overrides (any of the fields above)
      dock-7:
        min_confidence: 0.9
        routes: {SKU-100000: "C-11"}

Decision order: confidence below the station's threshold -> review (``low_confidence``); a station
route -> that chute (``station_override``); a global route -> that chute (``classified``); otherwise the
default chute (``unknown_sku``).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sorter.errors import ConfigError


class StationOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_chute: str | None = Field(None, min_length=1)
    review_chute: str | None = Field(None, min_length=1)
    min_confidence: float | None = Field(None, ge=0, le=1)
    routes: dict[str, str] = Field(default_factory=dict)


class RoutingTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_chute: str = Field(min_length=1)
    review_chute: str = Field(min_length=1)
    min_confidence: float = Field(0.8, ge=0, le=1)
    routes: dict[str, str] = Field(default_factory=dict)
    stations: dict[str, StationOverride] = Field(default_factory=dict)


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    chute: str
    reason: str


def decide(table: RoutingTable, station_id: str, sku: str | None, label: str | None, confidence: float) -> Decision:
    station = table.stations.get(station_id)
    threshold = station.min_confidence if station and station.min_confidence is not None else table.min_confidence
    if confidence < threshold:
        review = station.review_chute if station and station.review_chute else table.review_chute
        return Decision(chute=review, reason="low_confidence")
    keys = [k for k in (sku, label) if k]
    if station:
        for key in keys:
            if key in station.routes:
                return Decision(chute=station.routes[key], reason="station_override")
    for key in keys:
        if key in table.routes:
            return Decision(chute=table.routes[key], reason="classified")
    default = station.default_chute if station and station.default_chute else table.default_chute
    return Decision(chute=default, reason="unknown_sku")


def check_routes(table: RoutingTable, classes: list[str], skus: list[str], *, strict: bool = False) -> list[str]:
    """Route keys (global and per station) that name no SKU or label the model can produce: a typo
    (``botle-yellow-dots``) would silently send that product to the default chute. Each is logged as a
    warning naming the closest real one; with ``strict`` they stop start-up. Returns them."""
    import difflib

    from sorter.logs import get_logger

    known = set(classes) | set(skus)
    keys = [(k, k) for k in table.routes] + [
        (k, f"stations.{station}.{k}") for station, o in table.stations.items() for k in o.routes
    ]
    unknown = [where for key, where in keys if key not in known]
    for key, where in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            get_logger("sorter.routing").warning(
                "routes.unknown_key", key=where, did_you_mean=close[0] if close else None
            )
    if unknown and strict:
        raise ConfigError(
            f"routes name what the model cannot produce: {', '.join(unknown)} (its labels and SKUs are in the "
            "checkpoint: `sorter evaluate` lists them); fix the routing table or drop --strict-routes"
        )
    return unknown


def load_routing_table(path: Path) -> RoutingTable:
    """Read and validate a routing table; any problem stops start-up with the file and field named."""
    if not path.is_file():
        raise ConfigError(f"routing table {path} does not exist (set --routes or SORTER_ROUTES)")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"routing table {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc
    try:
        return RoutingTable.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"routing table {path} is invalid: {problems}") from exc
