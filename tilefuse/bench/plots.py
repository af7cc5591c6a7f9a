"""Matplotlib figures of a report (Agg backend, PNG files).

* ``kernels_<family>.png``: speedup over eager of every implementation, one bar group per case;
* ``latency_<model>.png``: latency CDFs of every variant, one panel per (input, dtype, batch);
* ``training.png``: training step time per configuration.

Every title carries the device label; CPU figures say "CPU (torch backend, tiny sizes - not a GPU
result)" and get a watermark, so no one mistakes them for GPU numbers.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, env: Dict[str, Any], title: str, path: Path) -> Path:
    """Title the figure with the run's device and versions (a CPU run is watermarked "CPU" so
    it is never mistaken for a GPU result), write it to ``path`` and close it."""
    from tilefuse.bench.report import device_label

    fig.suptitle(f"{title}\n{device_label(env)} | torch {env.get('torch')} | "
                 f"triton {env.get('triton')} | {str(env.get('date'))[:10]}", fontsize=9)
    if env.get("device_type") != "cuda":
        fig.text(0.5, 0.5, "CPU", fontsize=60, color="gray", alpha=0.15, ha="center",
                 va="center", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def kernel_speedups(report: Dict[str, Any], out_dir: Path) -> List[Path]:
    plt = _plt()
    by_family: Dict[str, Dict[str, Dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for e in report["entries"]:
        if e["kind"] == "kernel" and e.get("speedup_vs_eager"):
            by_family[e["family"]][f"{e['name']}/{e['dtype']}"][e["impl"]] = e["speedup_vs_eager"]
    paths = []
    for family, cases in sorted(by_family.items()):
        order = ("tilefuse", "eager", "compile", "vendor")
        impls = sorted({i for c in cases.values() for i in c},
                       key=lambda i: (order.index(i) if i in order else len(order), i))
        names = sorted(cases)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * max(1, len(impls)) / 2), 4))
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs = [i + j * width for i in range(len(names))]
            ax.bar(xs, [cases[n].get(impl, 0.0) for n in names], width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("speedup over eager (higher is better)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, report["env"], f"tilefuse kernels: {family}",
                           Path(out_dir) / f"kernels_{family}.png"))
    return paths


def latency_cdfs(report: Dict[str, Any], out_dir: Path) -> List[Path]:
    plt = _plt()
    by_model: Dict[str, Dict[str, List[Dict]]] = defaultdict(lambda: defaultdict(list))
    for e in report["entries"]:
        if e["kind"] == "model" and e.get("samples_ms"):
            by_model[e["model"]][e["group"]].append(e)
    paths = []
    for model, groups in sorted(by_model.items()):
        n = len(groups)
        fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
        for ax, (group, entries) in zip(axes[0], sorted(groups.items())):
            for e in entries:
                xs = sorted(e["samples_ms"])
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{e['impl']} (P50 {e['p50_ms']:.3g} ms)")
            ax.set_title("/".join(group.split("/")[2:]), fontsize=8)
            ax.set_xlabel("latency (ms)")
            ax.set_ylabel("fraction of runs")
            ax.legend(fontsize=6)
        paths.append(_save(fig, report["env"], f"tilefuse models: {model} latency CDF",
                           Path(out_dir) / f"latency_{model}.png"))
    return paths


def training_steps(report: Dict[str, Any], out_dir: Path) -> List[Path]:
    entries = [e for e in report["entries"] if e["kind"] == "train"]
    if not entries:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.barh([f"{e['model']} {e['impl']}" for e in entries], [e["time_ms"] for e in entries])
    ax.set_xlabel("training step time (ms, lower is better)")
    return [_save(fig, report["env"], "tilefuse training step", Path(out_dir) / "training.png")]


def write_all(report: Dict[str, Any], out_dir) -> List[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return kernel_speedups(report, out_dir) + latency_cdfs(report, out_dir) + \
        training_steps(report, out_dir)
