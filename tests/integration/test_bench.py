"""`sorter bench` end to end on a tiny model: every stage runs and the report holds what it promises."""

from __future__ import annotations

import json

import pytest

from sorter.bench import BenchConfig, plot, run, summary_lines

pytestmark = pytest.mark.integration


def test_the_benchmark_measures_every_stage_and_reports_ratios(bootstrap, redis_url, tmp_path):
    cfg = BenchConfig(
        backbone="mobilenet_v2",
        image_size=64,
        frames=64,
        batch_sizes=(8,),
        naive_frames=10,
        paced_seconds=3,
        pool=6,
        device="cpu",
        bootstrap=bootstrap,
        redis_url=redis_url,
    )
    r = run(cfg)
    for key in ("ceiling_fps", "e2e_fps", "naive_fps", "broker_fps"):
        assert r[key] > 0, key
    assert r["e2e"]["frames"] == 64 and r["paced"]["routed"] == r["paced"]["sent"] > 0
    assert r["e2e_over_ceiling"] == pytest.approx(r["e2e_fps"] / r["ceiling_fps"], rel=0.01)
    assert r["p99_ms_at_70pct"] == r["paced"]["latency"]["p99_ms"] > 0
    assert {row["overlap"] for row in r["ceiling"]["rows"]} == {False, True}
    png = plot(r, tmp_path / "bench.png")
    assert png.stat().st_size > 10_000
    assert any("of ceiling" in line for line in summary_lines(r))
    json.dumps(r)  # the --json line is serialisable
