"""`sorter capacity`: what to buy, from measured bench results only."""

from __future__ import annotations

import json

from sorter.bench.capacity import Line, machine_class, measured, plan, table

XEON = {"cpu": "Intel Xeon", "cpu_flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], "cores": 2, "gpu": None}
EPYC = {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "cores": 2, "gpu": None}


def _result(machine: dict, precision: str, rate: float, p99: float, e2e: float) -> dict:
    return {
        "machine": machine,
        "config": {"backbone": "resnet18", "image_size": 224, "compile": False, "delivery": "at-least-once"},
        "ceiling": {"precision": precision},
        "paced": {"rate": rate, "seconds": 20.0, "latency": {"p50_ms": p99 / 2, "p99_ms": p99}},
        "e2e_fps": e2e,
    }


def _write(folder, name: str, result: dict) -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(result))


def test_the_rate_at_the_budget_is_the_fastest_measured_run_within_it_never_an_extrapolation(tmp_path):
    _write(tmp_path, "int8/bench-a.json", _result(XEON, "int8", 55.0, 169.0, 220.0))
    _write(tmp_path, "int8/bench-b.json", _result(XEON, "int8", 109.0, 198.0, 219.0))
    _write(tmp_path, "int8/bench-c.json", _result(XEON, "int8", 154.0, 305.0, 219.0))
    _write(tmp_path, "bench-d.json", _result(EPYC, "fp32", 15.0, 733.0, 23.4))
    _write(tmp_path, "bench-notes.json", {"something": "else"})  # not a bench result: skipped
    nothing = _result(EPYC, "bf16", 10.0, 1.0, 20.0)
    nothing["paced"]["latency"] = {"p50_ms": None, "p99_ms": None}  # a paced run that routed nothing
    _write(tmp_path, "bench-empty.json", nothing)
    (tmp_path / "latency").mkdir()
    (tmp_path / "latency" / "bench-broken.json").write_text("{")
    points = measured(tmp_path)
    assert len(points) == 4
    line = Line(stations=12, items_per_s=2, cameras=4)  # 96 frames/s
    rows = {r["machine"].split()[1]: r for r in plan(points, line, budget_ms=300)}
    xeon, epyc = rows["Intel"], rows["AMD"]
    assert xeon["fps_at_budget"] == 109.0 and xeon["p99_ms"] == 198.0 and xeon["pods_at_budget"] == 1
    assert xeon["pods_at_saturation"] == 1 and xeon["paced_runs"] == 3
    assert epyc["fps_at_budget"] is None and epyc["pods_at_budget"] is None
    assert epyc["lowest_p99_ms"] == 733.0 and epyc["pods_at_saturation"] == 5  # ceil(96 / 23.4)
    tighter = {r["machine"].split()[1]: r for r in plan(points, line, budget_ms=180)}
    assert tighter["Intel"]["fps_at_budget"] == 55.0 and tighter["Intel"]["pods_at_budget"] == 2
    text = "\n".join(table(plan(points, line, 300), line, 300))
    assert "none measured (lowest p99 733 ms at 15)" in text and "96 frames/s" in text


def test_machine_classes_name_the_instructions_that_decide_speed():
    assert machine_class(XEON) == "2-core Intel Xeon (AVX-512 BF16 + VNNI)"
    assert machine_class(EPYC) == "2-core AMD EPYC (AVX2 only)"
    assert "AMX" in machine_class({**XEON, "cpu_flags": ["avx2", "amx_tile", "amx_int8"]})
    assert "flags not recorded" in machine_class({"cpu": "AMD EPYC", "cores": 2, "gpu": None})
    assert machine_class({"cpu": "Xeon", "cores": 16, "gpu": "NVIDIA H100"}) == "NVIDIA H100 + 16 CPU cores"


def test_capacity_without_results_is_one_line_and_exit_2(tmp_path):
    from tests.test_cli import _fails_in_one_line

    assert "run sorter bench first" in _fails_in_one_line("capacity", "--results", str(tmp_path))
