"""``tilefuse autotune``: tune kernels for this GPU ahead of time and manage the tuning DB.

    tilefuse autotune [--kernels matmul,int8_matmul,layer_norm] [--shapes FILE|model:NAME]
                      [--dtype fp16,bf16]
                      [--budget-s N] [--exhaustive] [--timer auto|bench|wall|model] [--force]
    tilefuse autotune --show | --clear | --export PATH
"""
from __future__ import annotations

import argparse
import difflib
import math
import sys
import time

from tilefuse.autotune import chain
from tilefuse.autotune.identity import current_identity
from tilefuse.autotune.space import geomean, get_space, registered_spaces

EXHAUSTIVE_DEFAULT_BUDGET_S = 120.0
_SHORT = {"GROUP_M": "g", "num_warps": "w", "num_stages": "s"}


def format_config(cfg) -> str:
    if not isinstance(cfg, dict):
        return "-"
    parts = []
    for k, v in cfg.items():
        name = _SHORT.get(k) or (k[len("BLOCK_"):].lower() if k.startswith("BLOCK_") else k + "=")
        parts.append(f"{name}{v}")
    return " ".join(parts)


def _num(v):
    """A finite positive time from a (possibly hand-edited) entry, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def _ms(v) -> str:
    if v is None:
        return "-"
    return "?" if _num(v) is None else f"{v:.4g}"


def _speedup(entry) -> str:
    d, b = _num(entry.get("default_time_ms")), _num(entry.get("time_ms"))
    return f"{d / b:.2f}x" if d and b else "-"


def _table(rows, header) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _progress_factory(enabled: bool):
    """progress(desc) -> callback(i, total): a bar on a terminal, plain lines in logs."""
    from tilefuse._progress import callback

    def make(desc):
        return callback(desc, unit="cfg") if enabled else None
    return make


def _split(value: str | None) -> list:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def entry_status(key: str, entry: dict, identity) -> str:
    """``yes`` (lookup uses it), ``invalid (not used)`` (current key, unusable config) or
    ``stale`` (another kernel source, Triton, GPU or an unknown kernel)."""
    space = get_space(str(entry.get("kernel", key.split("|", 1)[0])))
    if space is None or key != chain.db_key(space, identity, str(entry.get("bucket", ""))):
        return "stale"
    return "yes" if space.validate(entry.get("config")) else "invalid (not used)"


def _show(identity) -> int:
    print(f"device: {identity.name} (sm {identity.capability}), triton {identity.triton}")
    rows = []
    for source, db in (("user", chain.user_db(identity)), ("shipped", chain.shipped_table(identity))):
        print(f"{source} DB: {db.path} ({len(db)} entries)")
        for key, e in sorted(db.entries().items()):
            rows.append((source, str(e.get("kernel", "?")), str(e.get("bucket", "?")),
                         format_config(e.get("config")), _ms(e.get("time_ms")), _speedup(e),
                         entry_status(key, e, identity)))
    if rows:
        print()
        _table(rows, ("source", "kernel", "bucket", "config", "best ms", "vs default", "current"))
    return 0


def _export(identity, path) -> int:
    db = chain.user_db(identity)
    entries = {k: e for k, e in db.entries().items() if entry_status(k, e, identity) == "yes"}
    if not entries:
        print(f"nothing to export: no current entries in {db.path}", file=sys.stderr)
        return 1
    n = db.export(path, entries)
    print(f"exported {n} entries for {identity.name} to {path} (ship it as "
          f"tilefuse/autotune/tables/{identity.slug}.json)")
    return 0


def default_kernels() -> list:
    """Every registered family, matmul first (unlabelled shapes-file lines are matmul)."""
    names = registered_spaces()
    return sorted(names, key=lambda n: (n != "matmul", n))


def requested_kernels(value) -> list:
    """The families named by ``--kernels`` (all registered ones when empty); ValueError naming
    the unknown entries and listing the valid ones."""
    kernels = _split(value)
    if not kernels:
        return default_kernels()
    unknown = [k for k in kernels if get_space(k) is None]
    if unknown:
        valid = registered_spaces()
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if m else repr(k)
                 for k in unknown for m in [difflib.get_close_matches(k, valid, n=1)]]
        raise ValueError(f"--kernels: unknown kernel famil{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(hints)}; registered tuning spaces: {', '.join(valid)}")
    return list(dict.fromkeys(kernels))


def _interleave(problems) -> list:
    """Round-robin across families, so a short --budget-s reaches every family."""
    groups = {}
    for p in problems:
        groups.setdefault(p[0].name, []).append(p)
    out = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


def _problems(args, identity):
    """[(space, key)] with one problem per bucket, or raises ValueError."""
    from tilefuse.autotune.shapes import load_shapes

    kernels = requested_kernels(args.kernels)
    device = identity.torch_device.split(":")[0]
    dtypes = _split(args.dtype) or (["float16", "bfloat16"] if identity.is_cuda else ["float32"])
    models = None  # model:NAME builds the zoo's models here: the tuning library never imports
    if (args.shapes or "").startswith("model:"):  # tilefuse.models (its kernels import autotune)
        import tilefuse.models as models
    specs, origin = load_shapes(args.shapes, kernels, device, models)
    out, seen = [], set()
    for kernel, spec in specs:
        if args.kernels and kernel not in kernels:
            continue
        space = get_space(kernel)
        if space is None:
            print(f"skipping {kernel}: no tuning space registered (known: "
                  f"{', '.join(registered_spaces())})", file=sys.stderr)
            continue
        key = space.parse_shape(spec)
        keys = [key]
        if "dtype" not in key or args.dtype:
            keys = []
            for d in dtypes:
                try:
                    keys.append(space.parse_shape({**key, "dtype": d}))
                except ValueError as e:  # e.g. fp64 for a family without fp64 kernels
                    print(f"skipping {kernel} {d}: {e}", file=sys.stderr)
        for k in keys:
            bucket = space.bucket(k)
            if (kernel, bucket) not in seen:
                seen.add((kernel, bucket))
                out.append((space, k))
    if not args.shapes:
        out = _interleave(out)
    return out, origin


def _tune(args, identity) -> int:
    from tilefuse.autotune.tuner import get_timer

    try:
        requested_kernels(args.kernels)
    except ValueError as e:
        print(f"tilefuse autotune: {e}", file=sys.stderr)
        return 2
    if identity.name == "cpu":
        print("no CUDA GPU and TRITON_INTERPRET is not set: nothing runs Triton kernels here "
              "(set TRITON_INTERPRET=1 before running to tune through the interpreter)",
              file=sys.stderr)
        return 2
    try:
        problems, origin = _problems(args, identity)
        timer = get_timer(args.timer, identity.torch_device)
    except ValueError as e:
        print(f"tilefuse autotune: {e}", file=sys.stderr)
        return 2
    if not problems:
        print("nothing to tune (no problems for the requested kernels)", file=sys.stderr)
        return 2
    db = chain.user_db(identity)
    reason = db.unwritable_reason()
    if reason:
        print(f"tilefuse autotune: cannot save tuning results: {reason} (set TILEFUSE_CACHE_DIR "
              "to a writable directory)", file=sys.stderr)
        return 1
    print(f"tuning {len(problems)} problems ({origin}) on {identity.name}, timer {args.timer}, "
          f"DB {db.path}")
    per_problem = args.budget_s / len(problems) if args.budget_s else None
    if per_problem is None and args.exhaustive:
        per_problem = EXHAUSTIVE_DEFAULT_BUDGET_S
        print(f"--exhaustive without --budget-s: {per_problem:.0f} s per problem")
    progress = _progress_factory(not args.no_progress)
    rows, failed, speedups, skipped, tuned = [], 0, [], 0, 0
    start = time.perf_counter()
    for space, key in problems:
        bucket = space.bucket(key)
        entry, source = chain.stored_entry(space, identity, bucket)
        if entry is not None and not args.force:
            rows.append((space.name, space.describe(key), source + " (cached)",
                         _ms(entry.get("default_time_ms")), _ms(entry.get("time_ms")),
                         _speedup(entry), format_config(entry["config"])))
            continue
        if args.budget_s and tuned and time.perf_counter() - start > args.budget_s:
            skipped += 1  # the total budget is spent: later problems keep the heuristic
            rows.append((space.name, space.describe(key), "skipped (budget)", "-", "-", "-", "-"))
            continue
        entry = chain.tune_and_store(space, key, identity, timer=timer, budget_s=per_problem,
                                     exhaustive=args.exhaustive, max_configs=args.max_configs,
                                     progress=progress(space.describe(key)))
        tuned += 1
        if db.last_error:  # persisting is this command's job: stop, say why
            print(f"tilefuse autotune: could not write {db.path} ({db.last_error}); stopping "
                  f"after {tuned} problem(s), nothing more is tuned", file=sys.stderr)
            return 1
        if entry is None:
            failed += 1
            rows.append((space.name, space.describe(key), "FAILED", "-", "-", "-", "-"))
            continue
        if entry.get("default_time_ms"):
            speedups.append(entry["default_time_ms"] / entry["time_ms"])
        rows.append((space.name, space.describe(key), f"tuned ({entry['tried']} cfgs)",
                     _ms(entry.get("default_time_ms")), _ms(entry["time_ms"]), _speedup(entry),
                     format_config(entry["config"])))
    print()
    _table(rows, ("kernel", "problem", "status", "default ms", "best ms", "speedup", "config"))
    if speedups:
        print(f"\ngeomean speedup over the heuristic default: {geomean(speedups):.2f}x "
              f"(timer: {args.timer})")
    if skipped:
        print(f"\n{skipped} problems not tuned: --budget-s {args.budget_s:g} spent "
              "(they keep the heuristic config; run again to continue)")
    print(f"database: {db.path} ({len(db)} entries)")
    return 1 if failed else 0


def run(args) -> int:
    identity = current_identity()
    if args.clear:
        removed = chain.user_db(identity).clear()
        chain.reset()
        print(("removed " if removed else "nothing cached at ") + str(chain.cache_path(identity)))
        return 0
    if args.show:
        return _show(identity)
    if args.export:
        return _export(identity, args.export)
    return _tune(args, identity)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "autotune", help="tune kernels for this GPU and manage the tuning database",
        description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default=None,
                   help="comma-separated kernel families: matmul, int8_matmul, layer_norm "
                        "(default: every registered family)")
    p.add_argument("--shapes", default=None,
                   help="FILE (JSON list or 'MxNxK [dtype]' lines) or model:NAME "
                        "(e.g. model:resnet50, model:textcls); default: a built-in set")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes (fp16,bf16,fp32,fp64); default fp16,bf16 on "
                        "CUDA, fp32 in the interpreter")
    p.add_argument("--budget-s", type=float, default=None, dest="budget_s",
                   help="total tuning time budget in seconds, split across problems; once "
                        "spent, the remaining problems are skipped")
    p.add_argument("--max-configs", type=int, default=None, dest="max_configs",
                   help="try at most N configs per problem")
    p.add_argument("--exhaustive", action="store_true",
                   help="search the full pruned product space, not just the curated list")
    p.add_argument("--timer", default="auto", choices=("auto", "bench", "wall", "model"),
                   help="auto: do_bench on CUDA, wall clock on CPU; model: instant stand-in "
                        "for smoke tests (not a measurement)")
    p.add_argument("--force", action="store_true", help="re-tune problems already in the DB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--show", action="store_true", help="list what is cached for this GPU")
    g.add_argument("--clear", action="store_true", help="remove this GPU's user DB")
    g.add_argument("--export", metavar="PATH", help="write this GPU's current entries as a "
                   "shippable table")
    p.set_defaults(func=run)
    return p
