"""The routing policy: a prediction -> a chute, and why. A pure function over a routing table.

Routing table (YAML or JSON)::

    default_chute: "C-99"        # classified, but its SKU/label has no route of its own
    review_chute: "REVIEW"       # the model is not sure: a person looks
    min_confidence: 0.80         # below this (calibrated) confidence -> review_chute
    routes:                      # SKU id or class label -> chute (a SKU match wins over a label match)
      SKU-100000: "C-01"
      bottle-yellow-dots: "C-02"
    decision_deadline_ms: 800    # scan-to-divert budget: a frame older than this when read is not classified
    late_chute: "RECIRC"         # ... its item goes here at once (reason ``late``); required with a deadline
    fusion: {window_ms: 150, views: 3}  # several cameras per item: one decision from all its views (fusion.py)
    stations:                    # per-station overrides (any of the fields above; deadline 0: none here;
                                 # fusion views 1: each item decided from the views in its batch, as without)
      dock-7:
        min_confidence: 0.9
        routes: {SKU-100000: "C-11"}

Decision order: a frame past its station's deadline -> the late chute (``late``, see :func:`late`, applied
before the model runs); a photo scored as a product the model was never trained on -> review
(``unknown_product``, with the checkpoint's fitted threshold; ``review_unknown_products: false`` turns it
off, at the top level or for a station); confidence below the station's threshold -> review
(``low_confidence``); a station route -> that chute (``station_override``); a global route -> that chute
(``classified``); otherwise the default chute (``unknown_sku``).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sorter.errors import ConfigError


class Fusion(BaseModel):
    """Several cameras photograph each item: decide once all ``views`` of it were classified, or once
    ``window_ms`` passed since its first view reached the worker, whichever comes first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_ms: int = Field(gt=0, le=60_000, strict=True)
    views: int = Field(ge=1, le=64, strict=True)


class StationOverride(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_chute: str | None = Field(None, min_length=1)
    review_chute: str | None = Field(None, min_length=1)
    min_confidence: float | None = Field(None, ge=0, le=1)
    routes: dict[str, str] = Field(default_factory=dict)
    decision_deadline_ms: int | None = Field(None, ge=0, strict=True)  # 0: no deadline at this station
    late_chute: str | None = Field(None, min_length=1)
    review_unknown_products: bool | None = None
    fusion: Fusion | None = None


class RoutingTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_chute: str = Field(min_length=1)
    review_chute: str = Field(min_length=1)
    min_confidence: float = Field(0.8, ge=0, le=1)
    routes: dict[str, str] = Field(default_factory=dict)
    decision_deadline_ms: int | None = Field(None, gt=0, strict=True)  # None: classified however old
    late_chute: str | None = Field(None, min_length=1)
    # a photo the model scores as unlike every trained product (the checkpoint's fitted threshold) -> review
    review_unknown_products: bool = True
    fusion: Fusion | None = None  # None: the views of an item in one batch decide it (the most confident)
    stations: dict[str, StationOverride] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _a_deadline_needs_a_late_chute(self) -> RoutingTable:
        where = ["decision_deadline_ms"] if self.decision_deadline_ms is not None and not self.late_chute else []
        where += [
            f"stations.{name}"
            for name, o in self.stations.items()
            if o.decision_deadline_ms and not (o.late_chute or self.late_chute)
        ]
        if where:
            raise ValueError(
                f"a decision deadline needs a late_chute, where late items go (recirculation), at: {', '.join(where)}"
            )
        slow = [name or "(top level)" for name in ["", *self.stations]
                if (f := self.fusion_at(name)) and (d := self.deadline(name)) and f.window_ms >= d]  # fmt: skip
        if slow:
            raise ValueError(
                "fusion.window_ms must be shorter than decision_deadline_ms (an item waiting for its views would "
                f"pass its diverter), at: {', '.join('stations.' + n if n != '(top level)' else n for n in slow)}"
            )
        return self

    def deadline(self, station_id: str) -> int | None:
        """The station's scan-to-divert budget in ms, or None (no deadline there)."""
        station = self.stations.get(station_id)
        ms = station.decision_deadline_ms if station and station.decision_deadline_ms is not None else None
        ms = self.decision_deadline_ms if ms is None else ms
        return ms or None

    def fusion_at(self, station_id: str) -> Fusion | None:
        """The station's multi-camera fusion, or None (``views: 1`` there, or none set)."""
        station = self.stations.get(station_id)
        fusion = station.fusion if station and station.fusion is not None else self.fusion
        return fusion if fusion is not None and fusion.views > 1 else None

    @property
    def fuses(self) -> bool:
        return self.fusion_at("") is not None or any(self.fusion_at(name) for name in self.stations)


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    chute: str
    reason: str


def decide(
    table: RoutingTable,
    station_id: str,
    sku: str | None,
    label: str | None,
    confidence: float,
    *,
    unknown: bool = False,
) -> Decision:
    """``unknown``: the photo's unknown-product score is over the checkpoint's threshold (model/ood.py)."""
    station = table.stations.get(station_id)
    threshold = station.min_confidence if station and station.min_confidence is not None else table.min_confidence
    review = station.review_chute if station and station.review_chute else table.review_chute
    if unknown:
        on = station.review_unknown_products if station and station.review_unknown_products is not None else None
        if table.review_unknown_products if on is None else on:
            return Decision(chute=review, reason="unknown_product")
    if confidence < threshold:
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


def late(table: RoutingTable, station_id: str, age_ms: float | None) -> Decision | None:
    """The ``late`` decision for a frame ``age_ms`` old when read (captured-at to now), if that is past its
    station's deadline: its item has passed the diverter, so it goes to the late chute unclassified. None:
    in time, no deadline at this station, or no capture time to judge by."""
    deadline = table.deadline(station_id)
    if deadline is None or age_ms is None or age_ms <= deadline:
        return None
    station = table.stations.get(station_id)
    chute = station.late_chute if station and station.late_chute else table.late_chute
    return Decision(chute=chute, reason="late")


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
