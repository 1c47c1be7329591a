"""Estimation draws of fixed against sequential sampling, through the real pipeline, on the digits models.

    python benchmarks/bench_sequential.py [--json] [--quick] [--settings a,b] [--pa-out FILE]

The same held-out digits (``--images``, default 40: every 7th of the 297) are certified twice with
``certify_run`` on a private local Ray: ``--sampling fixed`` (every row all n estimation draws)
and ``--sampling sequential`` (rounds up to the same budget n, stopping once every requested
radius is settled for every K of the group). Same seeds: sequential draws are a prefix of the
fixed run's. Settings (the issue's):

- ``a``: dds and densepure K = 4 (b = 2), sigma 0.25, n = 20,000, radii 0.25 and 0.5 (up to 2 sigma);
  target >= 15x fewer estimation draws;
- ``b``: dds, sigma 0.25, n = 100,000, radii 0.25, 0.5, 0.75 (up to 3 sigma); target >= 10x fewer.

In both, certified accuracy at each requested radius must stay within one image of fixed
sampling. ``--quick`` runs the same code on 8 images with a tenth of the budgets. With ``--json``
one JSON object per line and (setting, method, K): ``setting``, ``method``, ``votes``, ``images``,
``n``, ``fixed_draws``, ``sequential_draws``, ``ratio``, ``accuracy_fixed``,
``accuracy_sequential`` (radius as a string -> certified accuracy), wall seconds of both runs.
``--pa-out FILE`` saves the fixed runs' estimated p_A (count / n of each correct row; 0 for wrong
or abstaining rows) for ``benchmarks/simulate_sequential.py --pa-file``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import dump, env_facts, load_average  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.metrics import certified_accuracy  # noqa: E402
from pipeline.run import certify_run  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "a": dict(methods=["dds", "densepure"], votes=[4], steps=2, sigmas=[0.25], n=20_000, radii=[0.25, 0.5], target=15.0),
    "b": dict(methods=["dds"], votes=[1], steps=2, sigmas=[0.25], n=100_000, radii=[0.25, 0.5, 0.75], target=10.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="a,b", help="comma list of a, b (default both)")
    p.add_argument("--images", type=int, default=None, help="held-out digits images (default 40; 8 with --quick)")
    p.add_argument("--quick", action="store_true", help="8 images, budgets / 10: a plumbing check of the same code")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--pa-out", default=None, help="save the fixed runs' p_A estimates (.npy)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _config(out: str, setting: dict[str, Any], sampling: str, images: int, args: argparse.Namespace, n: int) -> RunConfig:
    return RunConfig(
        out=out, data="digits", denoiser="digits", classifier="digits", methods=setting["methods"],
        sigmas=setting["sigmas"], votes=setting["votes"], steps=setting["steps"], n0=args.n0, n=n,
        alpha=args.alpha, sampling=sampling, radii=setting["radii"] if sampling == "sequential" else None,
        max_images=images, every=7, chunk=10_000, workers=args.workers, batch_size=args.batch_size, progress=False,
    )


def run_setting(name: str, args: argparse.Namespace, images: int, pas: list[float]) -> list[dict[str, Any]]:
    setting = SETTINGS[name]
    n = setting["n"] // 10 if args.quick else setting["n"]
    radii = setting["radii"] if not args.quick else [r for r in setting["radii"] if r <= 0.5]
    setting = {**setting, "radii": radii}
    tables, seconds = {}, {}
    root = tempfile.mkdtemp(prefix=f"bench-seq-{name}-")
    try:
        for sampling in ("fixed", "sequential"):
            start = time.perf_counter()
            summary = certify_run(_config(f"{root}/{sampling}", setting, sampling, images, args, n), log=lambda _: None)
            seconds[sampling] = time.perf_counter() - start
            tables[sampling] = summary.table
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fixed, seq = tables["fixed"], tables["sequential"]
    for r in fixed.itertuples():
        pas.append(r.count / r.n if (r.correct and not r.abstain) else 0.0)
    rows = []
    for (method, votes), part in fixed.groupby(["method", "votes"]):
        spart = seq[(seq["method"] == method) & (seq["votes"] == votes)]
        acc_f = certified_accuracy(part, radii, by=()).iloc[0]
        acc_s = certified_accuracy(spart, radii, by=()).iloc[0]
        fixed_draws = int(len(part) * n)
        seq_draws = int(spart["n_used"].sum())
        rows.append({
            "setting": name, "method": method, "votes": int(votes), "images": int(len(part)), "n": n, "radii": radii,
            "fixed_draws": fixed_draws, "sequential_draws": seq_draws, "ratio": fixed_draws / max(seq_draws, 1),
            "target_ratio": setting["target"] if not args.quick else None,
            "accuracy_fixed": {f"{r:g}": float(acc_f[r]) for r in radii},
            "accuracy_sequential": {f"{r:g}": float(acc_s[r]) for r in radii},
            "images_below_fixed": {f"{r:g}": int(round((acc_f[r] - acc_s[r]) * len(part))) for r in radii},
            "seconds_fixed": round(seconds["fixed"], 1), "seconds_sequential": round(seconds["sequential"], 1),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = args.images or (8 if args.quick else 40)
    facts = {**env_facts(), "load_avg_1min_before": round(load_average(), 2)}
    pas: list[float] = []
    for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
        if name not in SETTINGS:
            raise SystemExit(f"--settings: unknown setting {name!r} (use a, b)")
        for row in run_setting(name, args, images, pas):
            row.update(facts)
            if args.json:
                print(dump(row), flush=True)
            else:
                acc = ", ".join(f"r={r}: {row['accuracy_fixed'][r]:.3f} -> {row['accuracy_sequential'][r]:.3f}" for r in row["accuracy_fixed"])
                print(f"setting {row['setting']} {row['method']} K={row['votes']} ({row['images']} images, n={row['n']:,}): "
                      f"{row['fixed_draws']:,} -> {row['sequential_draws']:,} estimation draws, {row['ratio']:.1f}x fewer; "
                      f"certified accuracy {acc}; {row['seconds_fixed']} s -> {row['seconds_sequential']} s", flush=True)
    if args.pa_out:
        np.save(args.pa_out, np.asarray(pas, dtype=np.float64))
        print(json.dumps({"pa_out": args.pa_out, "values": len(pas)}) if args.json else f"p_A estimates: {args.pa_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
