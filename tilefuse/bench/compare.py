"""``tilefuse compare OLD.json NEW.json [--threshold 5%]``.

Entries are matched by ``key``. For each match the ratio ``new / old`` of ``time_ms`` (lower is
better) is computed; above ``1 + threshold`` it is a regression, below ``1 / (1 + threshold)`` an
improvement. When the two reports come from different devices (GPU name or CPU vs GPU) raw
times mean nothing, so each entry's time is first divided by its group's baseline in the same
report (the ``vendor`` implementation, else ``eager``; see :func:`report.baseline_impl`) and the
ratios of those relative times are compared; the output says so. Baseline entries themselves
are then 1.0 by construction and not judged.

The target table's pass / fail changes are listed too.

As a regression gate it fails closed: every entry of OLD must be in NEW (``--allow-missing``
lists them instead), at least one entry must be compared, and every ``time_ms`` must be a finite
positive number. Exit status: 0 no regression, 1 at least one regression beyond the threshold,
2 unusable input (unreadable file, missing entries, nothing compared, invalid times).
A directory argument names the report inside it (``kernels.json``, ``models.json`` or
``host.json``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from tilefuse.bench import report as rpt

REPORT_NAMES = ("kernels.json", "models.json", "host.json")
_LIST = 10  # keys named per problem in messages


def parse_threshold(text) -> float:
    """``"5%"`` -> 0.05 and ``"0.05"`` / ``0.05`` -> 0.05; a bare number >= 1 is ambiguous
    (5 %? 500 %?) and rejected with a ValueError, as are negative or non-finite values."""
    s = str(text).strip()
    pct = s.endswith("%")
    try:
        v = float(s[:-1]) if pct else float(s)
    except ValueError:
        raise ValueError(f"--threshold must look like '5%' or '0.05', got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"--threshold must be a finite non-negative amount, got {text!r}")
    if not pct and v >= 1:
        raise ValueError(f"--threshold {text!r} is ambiguous: write '{v:g}%' for {v:g} percent "
                         f"or a fraction below 1 such as '0.05' for 5%")
    v = v / 100.0 if pct else v
    if v >= 10:
        raise ValueError(f"--threshold out of range (0 to 1000%): {text!r}")
    return v


def _valid_time(v) -> bool:
    return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            and v > 0)


def invalid_times(r: Dict[str, Any]) -> List[str]:
    """``key (time_ms=...)`` for every entry whose time is not a finite positive number."""
    return [f"{e['key']} (time_ms={e.get('time_ms')!r})" for e in r["entries"]
            if not _valid_time(e.get("time_ms"))]


def resolve_report_path(path, kind: Optional[str] = None) -> Path:
    """``path`` itself, or for a directory the report inside it (``kind``.json when given)."""
    path = Path(path)
    if not path.is_dir():
        return path
    names = [f"{kind}.json"] if kind else list(REPORT_NAMES)
    found = [path / n for n in names if (path / n).is_file()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{path} is a directory without {' or '.join(names)}: name the report")
    raise ValueError(f"{path} holds {' and '.join(n.name for n in found)}: name the one to "
                     "compare")


def load_report(path, kind: Optional[str] = None) -> Dict[str, Any]:
    """A validated report from a file or a directory; ValueError with a message otherwise."""
    path = resolve_report_path(path, kind)
    try:
        return rpt.load(path)
    except OSError as e:  # a directory, a permission problem, ...
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e})") from None


def load_pair(old_path, new_path):
    """Both reports; a directory with both kinds takes the other argument's kind."""
    old_dir, new_dir = Path(old_path).is_dir(), Path(new_path).is_dir()
    if old_dir and not new_dir:
        new = load_report(new_path)
        return load_report(old_path, new.get("kind")), new
    old = load_report(old_path)
    return old, load_report(new_path, old.get("kind") if new_dir else None)


def _device_id(r: Dict[str, Any]) -> str:
    env = r.get("env", {})
    return env.get("gpu") or env.get("device_type") or "?"


def _relative_times(r: Dict[str, Any]) -> Dict[str, Optional[float]]:
    groups: Dict[str, Dict[str, Dict]] = {}
    for e in r["entries"]:
        if _valid_time(e.get("time_ms")):
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
        if not _valid_time(o) or not _valid_time(n):
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
        "compared": sum(r["ratio"] is not None for r in rows),
        "invalid": {"old": invalid_times(old), "new": invalid_times(new)},
        "target_changes": changes,
    }


def problems(res: Dict[str, Any], allow_missing: bool = False) -> List[str]:
    """Why ``res`` cannot pass as a regression gate (empty: it can)."""
    out = []
    for side in ("old", "new"):
        bad = res["invalid"][side]
        if bad:
            out.append(f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} in {side.upper()} "
                       f"without a finite positive time_ms: {', '.join(bad[:_LIST])}"
                       + (" ..." if len(bad) > _LIST else ""))
    missing = res["only_old"]
    if missing and not allow_missing:
        out.append(f"{len(missing)} entr{'y' if len(missing) == 1 else 'ies'} of OLD missing "
                   f"from NEW: {', '.join(missing[:_LIST])}" + (" ..." if len(missing) > _LIST
                                                              else "")
                   + " (pass --allow-missing if that is intended)")
    if not res["compared"]:
        out.append("no entry was compared (no matching keys with valid times): nothing to gate on")
    return out


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
        fmt = (lambda v: "-" if v is None else f"{v:.4g}" if _valid_time(v) else repr(v))
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
                 f"improvement(s) beyond {res['threshold'] * 100:g}% over {res['compared']} "
                 f"compared of {len(res['rows'])} matched entries")
    return "\n".join(lines)


def main(old_path, new_path, threshold="5%", allow_missing: bool = False) -> int:
    try:
        thr = parse_threshold(threshold)
        old, new = load_pair(old_path, new_path)
    except ValueError as e:
        print(f"tilefuse compare: {e}", file=sys.stderr)
        return 2
    res = compare(old, new, thr)
    print(format_result(res))
    bad = problems(res, allow_missing)
    for p in bad:
        print(f"tilefuse compare: {p}", file=sys.stderr)
    if bad:
        return 2
    return 1 if res["regressions"] else 0
