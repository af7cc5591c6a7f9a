"""The JSON report every ``tilefuse bench`` command writes, and its Markdown summary.

Schema (``schema_version`` 1)::

    {"schema": "tilefuse-bench", "schema_version": 1, "kind": "kernels" | "models",
     "created": ISO date, "env": {...environment()...},
     "entries": [ {"key", "group", "impl", "kind", "time_ms", ...}, ... ],
     "targets": [ rows of tilefuse.bench.targets.evaluate ],
     "errors": [ {"where", "error"}, ... ]}

Every entry has a unique ``key`` (``group/impl``), the ``group`` it is compared within (one kernel
case, one model configuration, one training model) and ``time_ms`` (lower is better: the kernel
median, the model P50 latency, the training step time). ``tilefuse compare`` matches entries by
``key``; across GPUs it compares each entry's time relative to its group's baseline
(:func:`baseline_impl`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

SCHEMA = "tilefuse-bench"
SCHEMA_VERSION = 1
KINDS = ("kernels", "models")
BASELINE_ORDER = ("vendor", "eager")  # per group: the first impl present is the baseline


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def environment(device: str = "cpu") -> Dict[str, Any]:
    """GPU, driver, torch, triton, tilefuse version, git commit, date and the backend used."""
    import torch

    import tilefuse
    from tilefuse import _backend

    info = _backend.describe()
    env: Dict[str, Any] = {
        "device_type": "cuda" if str(device).startswith("cuda") else "cpu",
        "gpu": None, "capability": None, "driver": None, "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": info["python"], "platform": info["platform"], "torch": torch.__version__,
        "triton": info["triton"], "tilefuse": tilefuse.__version__, "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": info["interpreter"],
    }
    if env["device_type"] == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except Exception:
            env["driver"] = None
    return env


def device_label(env: Dict[str, Any]) -> str:
    """``"NVIDIA H200"`` or ``"CPU (torch backend, tiny sizes - not a GPU result)"``."""
    if env.get("device_type") == "cuda":
        return env.get("gpu") or "CUDA GPU"
    return "CPU (torch backend, tiny sizes - not a GPU result)"


def new_report(kind: str, env: Dict[str, Any]) -> Dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": kind,
            "created": env.get("date"), "env": env, "entries": [], "targets": [], "errors": []}


def baseline_impl(impls) -> Optional[str]:
    for name in BASELINE_ORDER:
        if name in impls:
            return name
    return None


def validate(report: Any, source: str = "report") -> Dict[str, Any]:
    """Check the schema; raise ``ValueError`` naming ``source`` and the problem."""
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise ValueError(f"{source}: not a tilefuse bench report (missing schema={SCHEMA!r})")
    version = report.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise ValueError(f"{source}: unsupported schema_version {version!r} (this tilefuse "
                         f"reads 1..{SCHEMA_VERSION})")
    for field in ("env", "entries"):
        if field not in report:
            raise ValueError(f"{source}: missing field {field!r}")
    keys = set()
    for i, e in enumerate(report["entries"]):
        for field in ("key", "group", "impl", "kind"):
            if field not in e:
                raise ValueError(f"{source}: entry {i} has no {field!r}")
        if e["key"] in keys:
            raise ValueError(f"{source}: duplicate entry key {e['key']!r}")
        keys.add(e["key"])
    report.setdefault("targets", [])
    report.setdefault("errors", [])
    return report


def save(report: Dict[str, Any], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    validate(report, str(path))
    path.write_text(json.dumps(report, indent=1, sort_keys=False, default=str) + "\n")
    return path


def load(path) -> Dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate(data, str(path))


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _num(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def md_table(header: List[str], rows: List[List[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report: Dict[str, Any]) -> str:
    env = report["env"]
    out = [f"# tilefuse bench {report['kind']}: {device_label(env)}", "",
           f"torch {env.get('torch')}, triton {env.get('triton')}, tilefuse {env.get('tilefuse')}, "
           f"commit {(env.get('git_commit') or '?')[:10]}, driver {env.get('driver') or '-'}, "
           f"{env.get('date')}", ""]
    if env.get("device_type") != "cuda":
        out += ["**CPU run**: torch reference backend at tiny sizes; these numbers say nothing "
                "about GPU performance.", ""]
    kern = [e for e in report["entries"] if e["kind"] == "kernel"]
    if kern:
        out += ["## Kernels", "", md_table(
            ["case", "impl", "median ms", "TFLOP/s", "GB/s", "% peak", "x eager", "x vendor"],
            [[e["group"], e["impl"], e.get("time_ms"), e.get("tflops"), e.get("gbps"),
              e.get("pct_peak"), e.get("speedup_vs_eager"), e.get("speedup_vs_vendor")]
             for e in kern]), ""]
    models = [e for e in report["entries"] if e["kind"] == "model"]
    if models:
        out += ["## Models", "", md_table(
            ["model", "input", "dtype", "batch", "variant", "P50 ms", "P95 ms", "P99 ms",
             "items/s", "peak MB", "size MB"],
            [[e.get("model"), e.get("input"), e.get("dtype"), e.get("batch"), e["impl"],
              e.get("p50_ms"), e.get("p95_ms"), e.get("p99_ms"), e.get("throughput"),
              e.get("peak_mem_mb"), e.get("size_mb")] for e in models]), ""]
    train = [e for e in report["entries"] if e["kind"] == "train"]
    if train:
        out += ["## Training step", "", md_table(
            ["model", "config", "step ms", "peak MB", "x fp32"],
            [[e["group"].split("/")[-1], e["impl"], e.get("time_ms"), e.get("peak_mem_mb"),
              e.get("speedup_vs_fp32")] for e in train]), ""]
    if report.get("targets"):
        out += ["## Targets", "", md_table(
            ["table", "task", "model", "metric", "target", "measured", "status", "config", "note"],
            [[r["table"], r["task"], r.get("model"), r["metric"], r["target"], r.get("measured"),
              r["status"].upper(), r.get("config"), r.get("note")] for r in report["targets"]]),
            ""]
    if report.get("errors"):
        out += ["## Errors / unavailable", ""]
        out += [f"- `{e['where']}`: {e['error']}" for e in report["errors"]]
        out.append("")
    return "\n".join(out)
