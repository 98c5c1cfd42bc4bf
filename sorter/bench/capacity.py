"""What to buy: frames/s per pod within a latency budget, per measured machine class, and the pods a
line needs (stations x items/s x cameras).

Reads every ``bench-*.json`` under a folder, whichever machine wrote it (``sorter bench`` records the
CPU, its flags that matter and the GPU). A pod's rate at the budget is the highest *measured* paced
rate whose p99 (captured-at to command delivered) stayed within the budget: never extrapolated, so a
class whose runs all missed the budget says so, with the lowest p99 it reached. The drained end-to-end
rate is given beside it as what the pod moves with no latency promise.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Line:
    stations: int
    items_per_s: float  # per station
    cameras: int  # photos per item

    @property
    def frames_per_s(self) -> float:
        return self.stations * self.items_per_s * self.cameras

    def __str__(self) -> str:
        return (
            f"{self.stations} stations x {self.items_per_s:g} items/s x {self.cameras} camera(s) "
            f"= {self.frames_per_s:g} frames/s"
        )


def machine_class(m: dict) -> str:
    if m.get("gpu"):
        return f"{m['gpu']} + {m['cores']} CPU cores"
    flags = m.get("cpu_flags")
    if flags is None:
        isa = "flags not recorded"
    elif any(f.startswith("amx") for f in flags):
        isa = "AMX"
    elif "avx512_bf16" in flags:
        isa = "AVX-512 BF16 + VNNI" if "avx512_vnni" in flags else "AVX-512 BF16"
    elif "avx512_vnni" in flags:
        isa = "AVX-512 VNNI"
    elif "avx512f" in flags:
        isa = "AVX-512"
    else:
        isa = "AVX2 only" if "avx2" in flags else "no AVX2"
    return f"{m['cores']}-core {m['cpu']} ({isa})"


def _variant(r: dict) -> str:
    c = r["config"]
    return (
        f"{c['backbone']} {c['image_size']} px, {r['ceiling'].get('precision', '?')}"
        + (", compiled" if c.get("compile") else "")
        + (", exactly-once" if c.get("delivery") == "exactly-once" else "")
    )


def measured(folder: Path) -> list[dict]:
    """One point per bench result with a paced run: machine class, model variant, rate, p99, saturation."""
    points = []
    for path in sorted(folder.rglob("bench-*.json")):
        try:
            r = json.loads(path.read_text())
            lat = r["paced"]["latency"]
            if lat["p99_ms"] is None:
                continue  # a paced run that routed nothing measured no latency
            points.append(
                {
                    "machine": machine_class(r["machine"]),
                    "variant": _variant(r),
                    "rate": r["paced"]["rate"],
                    "p99_ms": lat["p99_ms"],
                    "p50_ms": lat["p50_ms"],
                    "seconds": r["paced"].get("seconds"),
                    "e2e_fps": r["e2e_fps"],
                    "file": str(path.relative_to(folder)),
                }
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a bench result, or one from before paced runs were recorded
    return points


def plan(points: list[dict], line: Line, budget_ms: float) -> list[dict]:
    """A row per (machine class, model variant): rate within the budget, saturation, and pods needed."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for p in points:
        groups[(p["machine"], p["variant"])].append(p)
    rows = []
    for (machine, variant), ps in groups.items():
        within = [p for p in ps if p["p99_ms"] is not None and p["p99_ms"] <= budget_ms]
        best = max(within, key=lambda p: p["rate"]) if within else None
        lowest = min((p for p in ps if p["p99_ms"] is not None), key=lambda p: p["p99_ms"], default=None)
        saturation = max(p["e2e_fps"] for p in ps)
        rows.append(
            {
                "machine": machine,
                "variant": variant,
                "fps_at_budget": best["rate"] if best else None,
                "p99_ms": best["p99_ms"] if best else None,
                "pods_at_budget": math.ceil(line.frames_per_s / best["rate"]) if best else None,
                "lowest_p99_ms": lowest["p99_ms"] if lowest else None,
                "lowest_p99_rate": lowest["rate"] if lowest else None,
                "e2e_fps": saturation,
                "pods_at_saturation": math.ceil(line.frames_per_s / saturation),
                "paced_runs": len(ps),
                "files": sorted(p["file"] for p in ps),
            }
        )
    return sorted(rows, key=lambda r: (r["fps_at_budget"] is None, -(r["fps_at_budget"] or 0), -r["e2e_fps"]))


def table(rows: list[dict], line: Line, budget_ms: float) -> list[str]:
    """The README's table, in Markdown."""
    out = [
        f"| machine | model | frames/s per pod, p99 <= {budget_ms:g} ms | pods for the line | "
        "frames/s drained (no latency promise) | pods at that rate | paced runs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["fps_at_budget"] is None:
            at_budget = f"none measured (lowest p99 {r['lowest_p99_ms']:.0f} ms at {r['lowest_p99_rate']:.0f})"
            pods = "-"
        else:
            at_budget = f"{r['fps_at_budget']:,.0f} (p99 {r['p99_ms']:.0f} ms)"
            pods = str(r["pods_at_budget"])
        out.append(
            f"| {r['machine']} | {r['variant']} | {at_budget} | {pods} | {r['e2e_fps']:,.0f} | "
            f"{r['pods_at_saturation']} | {r['paced_runs']} |"
        )
    out.append(f"\nLine: {line}; budget: p99 captured-at to command delivered <= {budget_ms:g} ms.")
    return out


def plot(rows: list[dict], line: Line, budget_ms: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['machine']}\n{r['variant']}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.8 * len(rows) + 1.6))
    ax.barh(names, [r["e2e_fps"] for r in rows], color="#ddd", label="drained (no latency promise)")
    ax.barh(names, [r["fps_at_budget"] or 0 for r in rows], color="#2a7", label=f"paced, p99 <= {budget_ms:g} ms")
    for i, r in enumerate(rows):
        text = (
            f"{r['pods_at_budget']} pod(s) within budget"
            if r["fps_at_budget"]
            else f"no run within budget (best p99 {r['lowest_p99_ms']:.0f} ms)"
        )
        ax.text(r["e2e_fps"] * 1.08, i, f"{text}; {r['pods_at_saturation']} at the drained rate", va="center",
                fontsize=8)  # fmt: skip
    ax.axvline(line.frames_per_s, color="#c33", ls="--", lw=1, label=f"the line: {line.frames_per_s:g} frames/s")
    ax.set_xscale("log")
    ax.set_xlim(right=max(r["e2e_fps"] for r in rows) * 40)
    ax.invert_yaxis()
    ax.set_xlabel("frames/s per pod (log)")
    ax.set_title(f"What to buy for {line}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
