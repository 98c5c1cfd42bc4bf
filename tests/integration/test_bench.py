"""`sorter bench` end to end on a tiny model: every stage runs and the report holds what it promises."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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
        quix_python=Path(sys.executable),  # sorter's own venv has no Quix Streams: the stage says so, the rest runs
    )
    r = run(cfg)
    for key in ("ceiling_fps", "e2e_fps", "naive_fps", "broker_fps"):
        assert r[key] > 0, key
    assert r["e2e"]["frames"] == 64 and r["paced"]["routed"] == r["paced"]["sent"] > 0
    camera = r["paced"]["camera"]  # "sent" counts what the broker acknowledged, not what was handed to it
    assert (
        camera["produced"] == camera["acked"] == r["paced"]["sent"] and camera["failed"] == camera["undelivered"] == 0
    )
    assert r["e2e_over_ceiling"] == pytest.approx(r["e2e_fps"] / r["ceiling_fps"], rel=0.01)
    assert r["p99_ms_at_70pct"] == r["paced"]["latency"]["p99_ms"] > 0
    stages = r["paced"]["latency_breakdown"]
    assert {"broker", "collect", "infer", "deliver", "commit"} <= set(stages)
    # the stages up to delivery account for the latency: their means add up to the mean latency
    assert all(v["p99_ms"] >= v["p50_ms"] >= 0 for v in stages.values())
    to_actuator = sum(v["mean_ms"] for stage, v in stages.items() if stage != "commit")
    assert to_actuator == pytest.approx(r["paced"]["latency"]["mean_ms"], abs=0.1 * len(stages))
    assert {row["overlap"] for row in r["ceiling"]["rows"]} == {False, True}
    png = plot(r, tmp_path / "bench.png")
    assert png.stat().st_size > 10_000
    assert any("of ceiling" in line for line in summary_lines(r))
    assert "cannot import quixstreams" in r["quix"]["error"] and r["quix_fps"] is None
    assert any(line.startswith("quix      failed") for line in summary_lines(r))
    json.dumps(r)  # the --json line is serialisable


@pytest.mark.skipif(not os.environ.get("SORTER_QUIX_PYTHON"), reason="set SORTER_QUIX_PYTHON to a venv with bench-quix")
def test_the_quix_streams_application_gives_every_item_one_command(bootstrap, tmp_path):
    from sorter.bench.inputs import make_checkpoint, make_frames
    from sorter.bench.quix import quix

    cfg = BenchConfig(backbone="mobilenet_v2", image_size=64, naive_frames=20, pool=4, device="cpu",
                      quix_python=Path(os.environ["SORTER_QUIX_PYTHON"]))  # fmt: skip
    frames = make_frames(cfg.pool)
    q = quix(cfg, frames, make_checkpoint(cfg, tmp_path, frames), bootstrap)
    assert q.get("error") is None, q
    assert q["commands"] == q["frames"] == 20 and q["missing"] == q["duplicates"] == q["unexpected"] == 0
    assert q["fps"] > 0 and q["versions"].startswith("quixstreams 3.")
