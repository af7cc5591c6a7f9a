"""``tilefuse compare OLD.json NEW.json [--threshold 5%]``.

Entries are matched by ``key``. For each match the ratio ``new / old`` of ``time_ms`` (lower is
better) is computed; above ``1 + threshold`` it is a regression, below ``1 / (1 + threshold)`` an
improvement. When the two reports come from different devices (GPU name or CPU vs GPU) raw
times mean nothing, so each entry's time is first divided by its group's baseline in the same
report (the ``vendor`` implementation, else ``eager``; see :func:`report.baseline_impl`) and the
ratios of those relative times are compared; the output says so. Baseline entries themselves
are then 1.0 by construction and not judged.

The target table's pass / fail changes are listed too. Exit status: 0 no regression, 1 at least one
regression beyond the threshold, 2 unreadable input.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from tilefuse.bench import report as rpt


def parse_threshold(text) -> float:
    """``"5%"`` -> 0.05, ``"0.05"`` -> 0.05, ``5`` -> 0.05 (numbers >= 1 are percent)."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"threshold must look like '5%' or '0.05', got {text!r}") from None
    if not s.endswith("%") and v >= 1:
        v /= 100.0
    if not 0 <= v < 10:
        raise ValueError(f"threshold out of range: {text!r}")
    return v


def _device_id(r: Dict[str, Any]) -> str:
    env = r.get("env", {})
    return env.get("gpu") or env.get("device_type") or "?"


def _relative_times(r: Dict[str, Any]) -> Dict[str, Optional[float]]:
    groups: Dict[str, Dict[str, Dict]] = {}
    for e in r["entries"]:
        if e.get("time_ms"):
            groups.setdefault(e["group"], {})[e["impl"]] = e
    out: Dict[str, Optional[float]] = {}
    for impls in groups.values():
        base = rpt.baseline_impl(impls)
        for impl, e in impls.items():
            if base is None or impl == base:
                out[e["key"]] = None
            else:
                out[e["key"]] = e["time_ms"] / impls[base]["time_ms"]
    return out


def compare(old: Dict[str, Any], new: Dict[str, Any], threshold: float = 0.05
            ) -> Dict[str, Any]:
    """Compare two validated reports; return a dict with ``rows``, ``regressions``, ... ."""
    cross = _device_id(old) != _device_id(new)
    if cross:
        old_t, new_t = _relative_times(old), _relative_times(new)
    else:
        old_t = {e["key"]: e.get("time_ms") for e in old["entries"]}
        new_t = {e["key"]: e.get("time_ms") for e in new["entries"]}
    rows: List[Dict[str, Any]] = []
    for key in sorted(set(old_t) & set(new_t)):
        o, n = old_t[key], new_t[key]
        if not o or not n:
            rows.append({"key": key, "old": o, "new": n, "ratio": None, "flag": "not compared"})
            continue
        ratio = n / o
        flag = ("REGRESSION" if ratio > 1 + threshold else
                "improved" if ratio < 1 / (1 + threshold) else "same")
        rows.append({"key": key, "old": o, "new": n, "ratio": ratio, "flag": flag})
    old_targets = {(t["table"], t["task"], t.get("model"), t["metric"]): t
                   for t in old.get("targets", [])}
    changes = []
    for t in new.get("targets", []):
        k = (t["table"], t["task"], t.get("model"), t["metric"])
        before = old_targets.get(k, {}).get("status", "absent")
        if before != t["status"]:
            changes.append({"target": " / ".join(str(x) for x in k if x), "old": before,
                            "new": t["status"], "measured": t.get("measured")})
    return {
        "cross_device": cross, "old_device": _device_id(old), "new_device": _device_id(new),
        "threshold": threshold, "rows": rows,
        "regressions": [r for r in rows if r["flag"] == "REGRESSION"],
        "improvements": [r for r in rows if r["flag"] == "improved"],
        "only_old": sorted(set(old_t) - set(new_t)), "only_new": sorted(set(new_t) - set(old_t)),
        "target_changes": changes,
    }


def format_result(res: Dict[str, Any]) -> str:
    unit = "time / baseline" if res["cross_device"] else "ms"
    lines = []
    if res["cross_device"]:
        lines.append(f"reports come from different devices ({res['old_device']} vs "
                     f"{res['new_device']}): comparing each entry's time relative to its "
                     f"vendor (else eager) baseline in the same report, not raw times")
    width = max([len(r["key"]) for r in res["rows"]] + [10])
    lines.append(f"{'key':<{width}}  {'old ' + unit:>18}  {'new ' + unit:>18}  {'new/old':>8}  "
                 f"flag")
    for r in res["rows"]:
        fmt = (lambda v: "-" if v is None else f"{v:.4g}")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"{r['key']:<{width}}  {fmt(r['old']):>18}  {fmt(r['new']):>18}  "
                     f"{ratio:>8}  {r['flag']}")
    if res["only_old"]:
        lines.append(f"only in OLD ({len(res['only_old'])}): " + ", ".join(res["only_old"][:10]))
    if res["only_new"]:
        lines.append(f"only in NEW ({len(res['only_new'])}): " + ", ".join(res["only_new"][:10]))
    if res["target_changes"]:
        lines.append("target status changes:")
        for c in res["target_changes"]:
            lines.append(f"  {c['target']}: {c['old']} -> {c['new']} (measured {c['measured']})")
    else:
        lines.append("target status changes: none")
    lines.append(f"{len(res['regressions'])} regression(s), {len(res['improvements'])} "
                 f"improvement(s) beyond {res['threshold'] * 100:g}% over {len(res['rows'])} "
                 f"matched entries")
    return "\n".join(lines)


def main(old_path, new_path, threshold="5%") -> int:
    try:
        thr = parse_threshold(threshold)
        old, new = rpt.load(old_path), rpt.load(new_path)
    except ValueError as e:
        print(f"tilefuse compare: {e}")
        return 2
    res = compare(old, new, thr)
    print(format_result(res))
    return 1 if res["regressions"] else 0
