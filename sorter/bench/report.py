"""The machine, the plot, the summary."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine() -> dict:
    cpu, flags = "?", []
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        present = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
        flags = [f for f in FLAGS_THAT_MATTER if f in present]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def save(result: dict, cfg, folder: Path) -> tuple[Path, Path]:
    """Write ``bench-<backbone>-<size>-<cpu|gpu>[-compiled][-eos].json`` and its plot into ``folder``: one
    name per configuration, so a rerun replaces its own result and no other."""
    import json

    tag = f"{cfg.backbone}-{cfg.image_size}-{'gpu' if result['machine']['gpu'] else 'cpu'}"
    tag += (
        ("-compiled" if cfg.compile else "")
        + ("-int8" if cfg.precision == "int8" else "")
        + ("-eos" if cfg.delivery == "exactly-once" else "")
    )
    tag += f"-paced{round(100 * cfg.paced_fraction)}" if cfg.paced_fraction != 0.7 else ""
    tag += f"-budget{cfg.latency_budget_ms}" if cfg.latency_budget_ms else ""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"bench-{tag}.json"
    data.write_text(json.dumps(result, indent=1) + "\n")
    return plot(result, folder / f"bench-{tag}.png"), data


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    names = ["naive\nloop", "end to end\n(worker)", "compute\nceiling", "broker\nonly"]
    values = [result["naive_fps"], result["e2e_fps"], result["ceiling_fps"], result["broker_fps"]]
    colours = ["#bbb", "#2a7", "#357", "#a85"]
    if result.get("quix_fps"):
        names, values, colours = ["Quix\nStreams", *names], [result["quix_fps"], *values], ["#999", *colours]
    bars = a.bar(names, values, color=colours)
    a.set_yscale("log")
    a.set_ylabel("frames/s (log)")
    a.bar_label(bars, fmt="%.0f")
    a.set_title(
        f"{result['config']['backbone']} {result['config']['image_size']} px, {result['ceiling']['precision']}, "
        f"{result['machine']['gpu'] or 'CPU'}"
    )
    e = result["e2e"]
    stages = {"decode wait": e["decode_wait_ms_per_frame"], "model": e["infer_ms_per_frame"],
              "broker, cache, routing": e["other_ms_per_frame"] or 0}  # fmt: skip
    b.barh(list(stages), list(stages.values()), color=["#8ac", "#357", "#a85"])
    b.set_xlabel("ms per frame (end to end, drained)")
    b.set_title("where the time goes")
    lat, stages = result["paced"]["latency"], result["paced"].get("latency_breakdown", {})
    rows = [*stages.items(), ("total (to delivery)", lat)]
    names = [name for name, _ in rows]
    p50 = [v["p50_ms"] or 0 for _, v in rows]
    p99 = [v["p99_ms"] or 0 for _, v in rows]
    colours = ["#bbb" if name == "commit" else "#8ac" for name in stages] + ["#2a7"]
    c.barh(names, p50, color=colours, label="p50 (grey: after delivery)")
    c.scatter(p99, names, marker="|", s=200, color="#c33", label="p99", zorder=3)
    c.axvline(100, color="#c33", ls="--", lw=1, label="target p99 100 ms")
    c.invert_yaxis()
    c.set_xlabel("ms per item, captured-at to command delivered")
    fraction = result["config"].get("paced_fraction", 0.7)
    c.set_title(f"per item at {fraction:.0%} load ({result['paced']['rate']:.0f} frames/s)")
    c.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_lines(r: dict) -> list[str]:
    e, p, m, c = r["e2e"], r["paced"], r["machine"], r["ceiling"]
    lat, rss = p["latency"], p["rss_mb"]
    return [
        f"machine: {m['cpu']} x{m['cores']}, GPU {m['gpu']}, torch {m['torch']}",
        f"model: {r['config']['backbone']} {r['config']['image_size']} px on {c['device']} "
        f"({c['precision']}, channels_last {c['channels_last']}, compiled {c['compiled']})",
        f"ceiling   {r['ceiling_fps']:8.1f} frames/s (batch {c['batch']}, overlap {c['overlap']})",
        f"e2e       {r['e2e_fps']:8.1f} frames/s = {r['e2e_over_ceiling']:.0%} of ceiling, "
        f"{r['e2e_over_naive']:.1f}x naive (mean batch {e['mean_batch']})",
        f"naive     {r['naive_fps']:8.1f} frames/s",
        f"broker    {r['broker_fps']:8.1f} frames/s (no model)",
        *_quix_lines(r.get("quix")),
        f"per frame: decode wait {e['decode_wait_ms_per_frame']} ms, model {e['infer_ms_per_frame']} ms, "
        f"rest {e['other_ms_per_frame']} ms",
        f"paced at {p['rate']} frames/s: latency p50 {lat['p50_ms']} p95 {lat['p95_ms']} p99 {lat['p99_ms']} ms; "
        f"RSS {rss['start']} -> {rss['end']} MB ({rss['slope_mb_per_min']} MB/min)",
        "  where the milliseconds go (paced; p50 / p99 ms): "
        + ", ".join(f"{k} {v['p50_ms']:g} / {v['p99_ms']:g}" for k, v in p.get("latency_breakdown", {}).items()),
    ]


def _quix_lines(q: dict | None) -> list[str]:
    if q is None:
        return []
    if q.get("error") and not q.get("fps"):
        return [f"quix      failed: {q['error']}"]
    return [
        f"quix      {q['fps']:8.1f} frames/s ({q['versions']}): {q['commands']} commands for {q['frames']} items, "
        f"{q['missing']} missing, {q['duplicates']} duplicates"
    ]
