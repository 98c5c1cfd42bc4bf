"""Table tests of the routing policy (a pure function)."""

import pytest

from sorter.errors import ConfigError
from sorter.stream.routing import RoutingTable, StationOverride, decide, late, load_routing_table

TABLE = RoutingTable(
    default_chute="C-99",
    review_chute="REVIEW",
    min_confidence=0.8,
    routes={"SKU-1": "C-01", "bottle": "C-02", "SKU-3": "C-03", "can": "C-04"},
    stations={
        "dock-7": StationOverride(min_confidence=0.95, routes={"SKU-1": "C-71"}, review_chute="REVIEW-7"),
        "dock-8": StationOverride(default_chute="C-88"),
    },
)


@pytest.mark.parametrize(
    "station, sku, label, confidence, chute, reason",
    [
        ("s1", "SKU-1", "box", 0.90, "C-01", "classified"),  # SKU route
        ("s1", "SKU-9", "bottle", 0.90, "C-02", "classified"),  # label route when the SKU has none
        ("s1", "SKU-3", "can", 0.90, "C-03", "classified"),  # a SKU match wins over a label match
        ("s1", "SKU-9", "jar", 0.90, "C-99", "unknown_sku"),  # neither: default chute
        ("s1", None, None, 0.90, "C-99", "unknown_sku"),
        ("s1", "SKU-1", "box", 0.79, "REVIEW", "low_confidence"),  # below threshold
        ("s1", "SKU-1", "box", 0.80, "C-01", "classified"),  # threshold is inclusive
        ("dock-7", "SKU-1", "box", 0.96, "C-71", "station_override"),  # station route
        ("dock-7", "SKU-1", "box", 0.90, "REVIEW-7", "low_confidence"),  # station threshold and review chute
        ("dock-7", "SKU-9", "bottle", 0.99, "C-02", "classified"),  # falls back to global routes
        ("dock-8", "SKU-9", "jar", 0.99, "C-88", "unknown_sku"),  # station default chute
        ("dock-8", "SKU-1", "box", 0.5, "REVIEW", "low_confidence"),  # global threshold and review
    ],
)
def test_decide(station, sku, label, confidence, chute, reason):
    decision = decide(TABLE, station, sku, label, confidence)
    assert (decision.chute, decision.reason) == (chute, reason)


def test_load_yaml_and_json(tmp_path):
    y = tmp_path / "routes.yaml"
    y.write_text(
        "default_chute: C-99\nreview_chute: R\nmin_confidence: 0.7\nroutes: {SKU-1: C-01}\n"
        "stations:\n  dock-1: {min_confidence: 0.9}\n"
    )
    table = load_routing_table(y)
    assert table.routes == {"SKU-1": "C-01"} and table.stations["dock-1"].min_confidence == 0.9
    j = tmp_path / "routes.json"
    j.write_text('{"default_chute": "C-99", "review_chute": "R"}')
    assert load_routing_table(j).min_confidence == 0.8


@pytest.mark.parametrize(
    "text, field",
    [
        ("review_chute: R\n", "default_chute"),
        ("default_chute: C\nreview_chute: R\nmin_confidence: 1.5\n", "min_confidence"),
        ("default_chute: C\nreview_chute: R\nstations: {d1: {min_confidnce: 0.5}}\n", "stations.d1.min_confidnce"),
        ("default_chute: C\nreview_chute: R\nroutes: [a, b]\n", "routes"),
        ("default_chute: [unclosed\n", "not valid YAML"),
        ("default_chute: C\nreview_chute: R\ndecision_deadline_ms: 800\n", "needs a late_chute"),
        ("default_chute: C\nreview_chute: R\nstations: {d1: {decision_deadline_ms: 500}}\n", "at: stations.d1"),
        ("default_chute: C\nreview_chute: R\ndecision_deadline_ms: 0\nlate_chute: L\n", "decision_deadline_ms"),
        ("default_chute: C\nreview_chute: R\ndecision_deadline_ms: true\nlate_chute: L\n", "decision_deadline_ms"),
        (  # a station that turns its deadline off does not excuse the top level's missing late chute
            'default_chute: C\nreview_chute: R\ndecision_deadline_ms: 800\nstations: {"": {decision_deadline_ms: 0}}\n',
            "needs a late_chute",
        ),
        ("default_chute: C\nreview_chute: R\nfusion: {window_ms: 150}\n", "fusion.views"),
        ("default_chute: C\nreview_chute: R\nfusion: {window_ms: 0, views: 3}\n", "fusion.window_ms"),
        ("default_chute: C\nreview_chute: R\nfusion: {window_ms: 150, views: 3, wait: 1}\n", "fusion.wait"),
        (
            "default_chute: C\nreview_chute: R\nstations: {d1: {fusion: {window_ms: '150', views: 2}}}\n",
            "stations.d1.fusion.window_ms",
        ),
    ],
)
def test_bad_tables_name_the_field(tmp_path, text, field):
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        load_routing_table(path)


def test_missing_table(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_routing_table(tmp_path / "nope.yaml")


def test_routes_the_model_cannot_produce_are_named_with_the_closest_label():
    import pytest
    from structlog.testing import capture_logs

    from sorter.errors import ConfigError
    from sorter.stream.routing import RoutingTable, check_routes

    table = RoutingTable(
        default_chute="C-99",
        review_chute="REVIEW",
        routes={"SKU-1": "C-01", "botle-yellow-dots": "C-02"},
        stations={"dock-7": {"routes": {"SKU-9": "C-11"}}},
    )
    with capture_logs() as logs:
        unknown = check_routes(table, classes=["bottle-yellow-dots", "box"], skus=["SKU-1", "SKU-2"])
    assert unknown == ["botle-yellow-dots", "stations.dock-7.SKU-9"]
    events = [e for e in logs if e["event"] == "routes.unknown_key"]
    assert events[0]["did_you_mean"] == "bottle-yellow-dots" and len(events) == 2
    with pytest.raises(ConfigError, match="botle-yellow-dots"):
        check_routes(table, classes=["bottle-yellow-dots", "box"], skus=["SKU-1", "SKU-2"], strict=True)


DEADLINES = RoutingTable(
    default_chute="C-99",
    review_chute="REVIEW",
    decision_deadline_ms=800,
    late_chute="RECIRC",
    stations={
        "dock-1": StationOverride(decision_deadline_ms=300, late_chute="RECIRC-1"),
        "dock-2": StationOverride(decision_deadline_ms=0),  # no deadline here
        "dock-3": StationOverride(late_chute="RECIRC-3"),  # the global deadline, its own chute
    },
)


@pytest.mark.parametrize(
    "table, station, age_ms, chute",
    [
        (DEADLINES, "s1", 801, "RECIRC"),  # past the global deadline
        (DEADLINES, "s1", 800, None),  # the deadline itself is in time
        (DEADLINES, "s1", None, None),  # no capture time: cannot be judged late
        (DEADLINES, "dock-1", 301, "RECIRC-1"),  # the station's own deadline and chute
        (DEADLINES, "dock-1", 299, None),
        (DEADLINES, "dock-2", 60_000, None),  # deadline 0 at the station: never late there
        (DEADLINES, "dock-3", 900, "RECIRC-3"),
        (DEADLINES, "dock-3", 700, None),
        (TABLE, "s1", 3_600_000, None),  # no deadline at all (the default): classified however old
    ],
)
def test_late(table, station, age_ms, chute):
    decision = late(table, station, age_ms)
    assert (decision and (decision.chute, decision.reason)) == ((chute, "late") if chute else None)


def test_a_station_deadline_takes_the_global_late_chute():
    table = RoutingTable(
        default_chute="C", review_chute="R", late_chute="L", stations={"d": StationOverride(decision_deadline_ms=100)}
    )
    assert late(table, "d", 101).chute == "L" and late(table, "other", 10**9) is None


FUSED = RoutingTable(
    default_chute="C",
    review_chute="R",
    fusion={"window_ms": 150, "views": 3},
    stations={
        "tunnel-2": StationOverride(fusion={"window_ms": 80, "views": 5}),
        "single": StationOverride(fusion={"window_ms": 150, "views": 1}),  # one camera here: off
    },
)


@pytest.mark.parametrize(
    "table, station, expected",
    [
        (FUSED, "tunnel-1", (150, 3)),
        (FUSED, "tunnel-2", (80, 5)),
        (FUSED, "single", None),
        (TABLE, "s1", None),
        (
            RoutingTable(
                default_chute="C",
                review_chute="R",
                stations={"t": StationOverride(fusion={"window_ms": 9, "views": 2})},
            ),
            "t",
            (9, 2),
        ),
    ],
)
def test_fusion_per_station(table, station, expected):
    fusion = table.fusion_at(station)
    assert (fusion and (fusion.window_ms, fusion.views)) == expected
    assert table.fuses == (table is not TABLE)
