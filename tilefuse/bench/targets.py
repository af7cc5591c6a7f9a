"""The cheat-sheet targets (``targets.toml``) and the pass / fail / unmeasured table of a report.

``load_targets()`` reads the TOML with :mod:`tomllib` (Python 3.11+), else ``tomli`` (the same
parser, a dependency on Python 3.10).

``evaluate(report)`` turns a report's model and training entries into rows::

    {"table": "inference", "task": ..., "model": ..., "metric": "latency_ms", "target": "< 10 ms",
     "measured": 7.9, "status": "pass", "config": "patched fp16 bs1 3x224x224", "note": ...}

Only a CUDA report is judged: on a CPU report every row is ``unmeasured`` (the measured CPU value
is still shown) so no one mistakes a CPU smoke run for a GPU result.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: tomli, declared in pyproject.toml
    import tomli as tomllib

TARGETS_PATH = Path(__file__).with_name("targets.toml")
STATUSES = ("pass", "fail", "unmeasured")


def load_targets(path: Optional[Path] = None) -> Dict[str, Any]:
    """``targets.toml`` (or ``path``) as a dict; a ValueError naming the file if it is not TOML."""
    path = Path(path or TARGETS_PATH)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def _fmt(v: Optional[float]) -> Optional[float]:
    return None if v is None else float(f"{v:.4g}")


def _config(e: Dict[str, Any]) -> str:
    return f"{e.get('impl')} {e.get('dtype')} bs{e.get('batch')} {e.get('input')}"


def _judge(row: Dict[str, Any], ok: Optional[bool], gpu: bool) -> Dict[str, Any]:
    if ok is None:
        row["status"] = "unmeasured"
    elif not gpu:
        row["status"] = "unmeasured"
        row["note"] = ("CPU run: measured value shown, GPU target not judged. "
                       + row.get("note", "")).strip()
    else:
        row["status"] = "pass" if ok else "fail"
    return row


def _inference_rows(spec, entries, gpu) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    base = {"table": "inference", "task": spec["task"], "note": spec.get("note", "")}
    if not spec.get("models"):
        rows.append(_judge(dict(base, model=None, metric="all", target="-", measured=None,
                                config=None), None, gpu))
        return rows
    unit = spec.get("throughput_unit", "items/s")
    for model in spec["models"]:
        cands = [e for e in entries if e.get("model") == model and "time_ms" in e
                 and (not spec.get("input") or e.get("input") == spec["input"])]
        bs1 = [e for e in cands if e.get("batch") == 1]
        best = min(bs1, key=lambda e: e.get("p50_ms", e["time_ms"]), default=None)
        lat = best.get("p50_ms", best["time_ms"]) if best else None
        rows.append(_judge(dict(base, model=model, metric="latency_ms",
                                target=f"< {spec['latency_ms']:g} ms (P50, batch 1)",
                                measured=_fmt(lat), config=_config(best) if best else None),
                           None if best is None else lat < spec["latency_ms"], gpu))
        tp = [e for e in cands if e.get("throughput")]
        best = max(tp, key=lambda e: e["throughput"], default=None)
        rows.append(_judge(dict(base, model=model, metric="throughput",
                                target=f"> {spec['throughput']:g} {unit}",
                                measured=_fmt(best["throughput"]) if best else None,
                                config=_config(best) if best else None),
                           None if best is None else best["throughput"] > spec["throughput"], gpu))
        sz = [e for e in cands if e.get("size_mb")]
        best = min(sz, key=lambda e: e["size_mb"], default=None)
        rows.append(_judge(dict(base, model=model, metric="size_mb",
                                target=f"< {spec['size_mb']:g} MB (state_dict)",
                                measured=_fmt(best["size_mb"]) if best else None,
                                config=f"{best.get('dtype')}" if best else None),
                           None if best is None else best["size_mb"] < spec["size_mb"], gpu))
    return rows


def _training_rows(spec, entries, gpu) -> List[Dict[str, Any]]:
    groups = sorted({e["group"] for e in entries})
    rows = []
    for group in groups or [None]:
        by_impl = {e["impl"]: e for e in entries if e["group"] == group}
        b, v = by_impl.get(spec["baseline"]), by_impl.get(spec["variant"])
        row = {"table": "training", "task": spec["name"], "model": group and group.split("/")[-1],
               "metric": f"{spec['baseline']} / {spec['variant']} step time",
               "target": f">= {spec['min_ratio']:g}x ({spec['claim']})", "measured": None,
               "config": spec["variant"], "note": ""}
        ok = None
        if b and v and b.get("time_ms") and v.get("time_ms"):
            ratio = b["time_ms"] / v["time_ms"]
            row["measured"] = _fmt(ratio)
            ok = ratio >= spec["min_ratio"]
            if spec.get("memory_less"):
                bm, vm = b.get("peak_mem_mb"), v.get("peak_mem_mb")
                row["note"] = f"peak memory {vm} MB vs {bm} MB"
                ok = ok and bm is not None and vm is not None and vm < bm
        rows.append(_judge(row, ok, gpu))
    return rows


def evaluate(report: Dict[str, Any], targets: Optional[Dict[str, Any]] = None
             ) -> List[Dict[str, Any]]:
    """The targets table for ``report`` (a dict as written by :mod:`tilefuse.bench.report`)."""
    targets = targets or load_targets()
    gpu = report.get("env", {}).get("device_type") == "cuda"
    entries = report.get("entries", [])
    models = [e for e in entries if e.get("kind") == "model"]
    train = [e for e in entries if e.get("kind") == "train"]
    rows: List[Dict[str, Any]] = []
    for spec in targets.get("inference", []):
        rows += _inference_rows(spec, models, gpu)
    for spec in targets.get("training", []):
        rows += _training_rows(spec, train, gpu)
    return rows


def peaks_for(gpu_name: str, targets: Optional[Dict[str, Any]] = None) -> Optional[Dict]:
    """The peak-table row whose ``match`` is a substring of ``gpu_name`` (None if unknown)."""
    targets = targets or load_targets()
    for row in targets.get("peaks", []):
        if row["match"].lower() in (gpu_name or "").lower():
            return row
    return None
