"""Draws per second of the engine and of the reference code's loop, on the same model and work.

    python benchmarks/bench_engine.py --model cifar10|imagenet|digits [--device cuda] [--json]

Both sides certify the same image: ``--draws`` noisy draws at ``--sigma``, each decided by the
majority of K = ``--votes`` purifications with b = ``--steps`` reverse steps, then classified.

- engine: ``workers.engine.Engine.count`` (votes share the first step: 1 + K(b-1) UNet forwards
  per draw; draws x votes batched; per-draw generators), with its own defaults unless
  ``--batch-size``, ``--engine-precision``, ``--channels-last``, ``--compile`` say otherwise;
- reference: ``benchmarks/reference.py``, the DensePure reference loop (K separate vote runs,
  every step evaluated: K b forwards per draw, batches of ``--reference-batch`` draws, a Python
  loop per step, fp16 UNet torso on GPU for ImageNet as the reference's use_fp16, fp32 otherwise).

Timing: ``--warmup`` untimed runs of each side, then ``--repeats`` timed runs alternating which
side goes first; medians are reported, and the ratio is engine draws/s over reference draws/s
(medians of the same run). UNet forwards/s count images through the network; model FLOP
utilisation (GPU) = forwards/s x FLOPs per forward (checkpoint manifests) / the device's dense
bf16 peak (``benchmarks.common.PEAK_FLOPS``, ``--peak-tflops`` overrides).

The classifier: the bundled digits CNN for ``digits``; for ``cifar10`` and ``imagenet`` a cheap
stand-in (4x4 average pool + one linear layer), the same instance on both sides, because the
issue is the diffusion loop (DensePure's ViT/BEiT would add the same cost to both).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    FACTS,
    MODELS,
    benchmark_image,
    device_name,
    dump,
    env_facts,
    load_average,
    load_models,
    median,
    peak_flops,
    sync,
)
from benchmarks.reference import ReferenceLoop  # noqa: E402
from workers.seeds import draw_seeds  # noqa: E402
from workers.engine import Engine  # noqa: E402
from workers.purify import PurifySpec  # noqa: E402


def default_workload(model: str, device: torch.device) -> dict[str, int]:
    """Draws, repeats and warm-ups per model and device: >= one reference batch, minutes not hours."""
    ref_batch = FACTS[model].reference_batch
    if device.type == "cuda":
        draws = {"cifar10": 1000, "imagenet": 64, "digits": 2000}[model]
        return {"draws": draws, "reference_batch": ref_batch, "repeats": 5, "warmup": 1}
    if model == "imagenet":
        # 2.24 TFLOP per forward: about 10 s per image-forward on a 2-core CPU.
        return {"draws": 1, "reference_batch": 1, "repeats": 1, "warmup": 0}
    return {"draws": {"cifar10": 100, "digits": 1000}[model], "reference_batch": ref_batch, "repeats": 5, "warmup": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--votes", type=int, default=4, help="K (default 4)")
    p.add_argument("--steps", type=int, default=2, help="b (default 2)")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--draws", type=int, help="noisy draws per timed run (default: per model and device)")
    p.add_argument("--repeats", type=int, help="timed runs per side (default 5; 1 for ImageNet on CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs per side first (default 1; 0 for ImageNet on CPU)")
    p.add_argument("--batch-size", type=int, help="engine: images per UNet batch (default: the engine's own)")
    p.add_argument("--reference-batch", type=int, help="reference: draws per batch (default: CIFAR-10 100, ImageNet 16, digits 100)")
    p.add_argument("--engine-precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="default: auto, the engine's own (bf16 on CUDA and on CPUs with native bf16, else fp32)")
    p.add_argument("--reference-precision", choices=["auto", "fp32"], default="auto",
                   help="auto: the reference's own (fp16 torso for ImageNet on GPU, else fp32)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto", help="engine (auto: the engine's default)")
    p.add_argument("--compile", action="store_true", help="engine: torch.compile the networks")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--peak-tflops", type=float, help="device peak dense bf16 TFLOP/s for the utilisation (default: table)")
    p.add_argument("--extra-engine", action="append", default=[], metavar="VARIANT",
                   help="also time another engine configuration in the same run, e.g. bf16:cl or fp32:cl:compile "
                        "(tokens: fp32|bf16|fp16, cl|nocl, compile, batch=N); repeatable")
    p.add_argument("--no-reference", action="store_true", help="time the engine only")
    p.add_argument("--no-early-majority-comparison", action="store_true",
                   help="skip timing the engine with every vote computed (early majority off) in the same run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def parse_variant(text: str) -> dict[str, Any]:
    """An extra engine configuration: tokens joined by ':' - a precision (fp32, bf16, fp16),
    cl / nocl (channels_last), compile, batch=N, allvotes (early majority off). E.g. ``bf16:cl``,
    ``fp32:cl:compile``."""
    settings: dict[str, Any] = {"precision": None, "channels_last": None, "compile": False, "batch_size": None,
                                "early_majority": True}
    for token in filter(None, text.split(":")):
        if token in ("fp32", "bf16", "fp16"):
            settings["precision"] = token
        elif token in ("cl", "nocl"):
            settings["channels_last"] = token == "cl"
        elif token == "compile":
            settings["compile"] = True
        elif token.startswith("batch="):
            settings["batch_size"] = int(token.split("=", 1)[1])
        elif token == "allvotes":
            settings["early_majority"] = False
        else:
            raise SystemExit(f"--extra-engine {text!r}: unknown token {token!r} (use fp32|bf16|fp16, cl|nocl, compile, batch=N, allvotes)")
    return settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = default_workload(args.model, device)
    draws = args.draws or work["draws"]
    ref_batch = args.reference_batch or work["reference_batch"]
    repeats = args.repeats if args.repeats is not None else work["repeats"]
    warmup = args.warmup if args.warmup is not None else work["warmup"]
    if args.model == "imagenet" and device.type == "cpu":
        warnings.warn("ImageNet's 256x256 UNet on CPU: about 10 s per image-forward; tiny default workload "
                      f"({draws} draw(s), {repeats} repeat(s), no warm-up): indicative only", stacklevel=2)
    if repeats < 5:
        warnings.warn(f"{repeats} repeat(s): medians of fewer than 5 runs are noisy", stacklevel=2)

    classifier, denoiser, classifier_what = load_models(args.model, args.seed)
    image = benchmark_image(args.model, denoiser, args.seed)
    facts = FACTS[args.model]
    ref_fp16 = args.reference_precision == "auto" and facts.reference_fp16 and device.type == "cuda"
    reference = None
    if not args.no_reference:
        # Built first: it copies the fp32 networks before an engine converts them in place.
        reference = ReferenceLoop(classifier, denoiser, device, args.sigma, args.steps, args.votes, ref_batch, ref_fp16)
    main_cfg = {"precision": args.engine_precision, "channels_last": {"auto": None, "on": True, "off": False}[args.channels_last],
                "compile": args.compile, "batch_size": args.batch_size, "early_majority": True}
    configs = [("engine", main_cfg)]
    if not args.no_early_majority_comparison and args.votes > 1:
        # The same engine with every vote computed, in the same run: the early-majority ratio.
        configs.append(("engine[allvotes]", {**main_cfg, "early_majority": False}))
    configs += [(f"engine[{v}]", parse_variant(v)) for v in args.extra_engine]
    engines: dict[str, Engine] = {}
    for i, (name, cfg) in enumerate(configs):
        # Each engine gets its own copy of the networks: engines convert them in place
        # (memory format, device), and the copies share nothing that one run could change.
        cls, den = (classifier, denoiser) if i == len(configs) - 1 else (copy.deepcopy(classifier), copy.deepcopy(denoiser))
        engines[name] = Engine(cls, den, device, batch_size=cfg["batch_size"], precision=cfg["precision"] or "auto",
                               compile=cfg["compile"], channels_last=cfg["channels_last"],
                               early_majority=cfg.get("early_majority", True))
    spec = PurifySpec("densepure", args.sigma, args.steps, args.votes)
    seeds = draw_seeds(args.seed, 0, args.sigma, "estimate", 0, draws)

    counts: dict[str, Any] = {}
    computed: dict[str, Any] = {}

    def engine_once(name: str) -> None:
        out = engines[name].count(image, spec, seeds)
        counts[name] = out.counts[0].tolist()
        computed[name] = (out.unet_forwards, out.votes_computed)

    def engine_side(name: str) -> Callable[[], None]:
        return lambda: engine_once(name)

    sides: dict[str, Callable[[], Any]] = {name: engine_side(name) for name in engines}
    if reference is not None:
        sides["reference"] = lambda: counts.__setitem__("reference", reference.count(image, draws, args.seed, args.seed).tolist())
    load_before = load_average()
    warm: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(warmup):
        for name, fn in sides.items():
            warm[name].append(_timed(fn, device))
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(repeats):
        # Alternate the order, so that a slow drift in machine load hits every side alike.
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(_timed(sides[name], device))
    load_after = load_average()

    name_of_device = device_name(device)
    peak = peak_flops(name_of_device, args.peak_tflops) if device.type == "cuda" else None
    # Measured, not nominal: early majority skips votes (and their forwards) draw by draw.
    per_draw = {name: computed[name][0] / draws for name in engines}
    per_draw["reference"] = args.votes * args.steps

    def side_figures(name: str) -> dict[str, Any]:
        med = median(times[name])
        dps = draws / med
        fig: dict[str, Any] = {
            "seconds": [round(t, 4) for t in times[name]],
            "warmup_seconds": [round(t, 4) for t in warm[name]],
            "median_seconds": round(med, 4),
            "draws_per_s": dps,
            "forwards_per_s": dps * per_draw[name],
            "counts": counts.get(name),
        }
        if facts.flops_per_forward:
            achieved = dps * per_draw[name] * facts.flops_per_forward
            fig["tflops"] = achieved / 1e12
            fig["mfu"] = achieved / peak if peak else None
        return fig

    def engine_settings(name: str) -> dict[str, Any]:
        e = engines[name]
        return {"batch_size_images": e.batch_size, "precision": e.precision, "early_majority": e.early_majority,
                "channels_last": e.channels_last, "compile": e.compiled, "unet_forwards_per_draw": per_draw[name],
                "votes_computed_share": computed[name][1] / (draws * args.votes)}

    result: dict[str, Any] = {
        "model": args.model,
        "device": device.type,
        "device_name": name_of_device,
        "K": args.votes,
        "b": args.steps,
        "sigma": args.sigma,
        "draws": draws,
        "repeats": repeats,
        "warmup": warmup,
        "classifier": classifier_what,
        "unet_parameters": sum(p.numel() for p in denoiser.parameters()),
        "flops_per_forward": facts.flops_per_forward,
        "peak_flops": peak,
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(load_after, 2),
        **env_facts(),
        "engine": engine_settings("engine"),
    }
    for key, value in side_figures("engine").items():
        result[f"engine_{key}"] = value
    if reference is not None:
        result["reference"] = {"batch_draws": ref_batch, "precision": reference.precision, "unet_forwards_per_draw": per_draw["reference"]}
        for key, value in side_figures("reference").items():
            result[f"reference_{key}"] = value
        result["ratio"] = result["engine_draws_per_s"] / result["reference_draws_per_s"]
        result["ratio_per_repeat"] = [round(r / e, 3) for e, r in zip(times["engine"], times["reference"])]
    if "engine[allvotes]" in engines:
        allvotes = draws / median(times["engine[allvotes]"])
        result["early_majority_ratio"] = result["engine_draws_per_s"] / allvotes
        result["early_majority_ratio_per_repeat"] = [round(a / e, 3) for e, a in zip(times["engine"], times["engine[allvotes]"])]
        result["votes_computed_share"] = computed["engine"][1] / (draws * args.votes)
        result["counts_equal_with_all_votes"] = counts["engine"] == counts["engine[allvotes]"]
    result["variants"] = []
    for name in list(engines)[1:]:
        variant = {"name": name, **engine_settings(name), **side_figures(name)}
        if reference is not None:
            variant["ratio"] = variant["draws_per_s"] / result["reference_draws_per_s"]
        result["variants"].append(variant)
    return result


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"model {r['model']} on {r['device_name']} ({r['device']}), torch {r['torch']}, {r['threads']} threads",
        f"work: {r['draws']} draws, K={r['K']}, b={r['b']}, sigma={r['sigma']}; classifier: {r['classifier']}",
        f"load average (1 min) {r['load_avg_1min_before']} before, {r['load_avg_1min_after']} after; "
        f"median of {r['repeats']} after {r['warmup']} warm-up",
        "",
        f"{'side':<16} {'draws/s':>10} {'forwards/s':>11} {'fwd/draw':>8} {'TFLOP/s':>8} {'MFU':>6}  settings",
    ]
    for name in ("engine", "reference"):
        if f"{name}_draws_per_s" not in r:
            continue
        s = r[name]
        settings = (f"batch {s['batch_size_images']} images, {s['precision']}, early majority {s['early_majority']}, "
                    f"channels_last={s['channels_last']}, compile={s['compile']}") if name == "engine" else \
                   f"batch {s['batch_draws']} draws, {s['precision']}, one run per vote"
        tflops = f"{r[name + '_tflops']:.3f}" if r.get(name + "_tflops") is not None else "-"
        mfu = f"{100 * r[name + '_mfu']:.1f}%" if r.get(name + "_mfu") is not None else "-"
        lines.append(f"{name:<16} {r[name + '_draws_per_s']:>10.3f} {r[name + '_forwards_per_s']:>11.2f} "
                     f"{s['unet_forwards_per_draw']:>8.1f} {tflops:>8} {mfu:>6}  {settings}")
        lines.append(f"{'':<16} seconds: {r[name + '_seconds']}")
    for v in r.get("variants", []):
        tflops = f"{v['tflops']:.3f}" if v.get("tflops") is not None else "-"
        mfu = f"{100 * v['mfu']:.1f}%" if v.get("mfu") is not None else "-"
        ratio = f", ratio {v['ratio']:.2f}x" if "ratio" in v else ""
        lines.append(f"{v['name']:<16} {v['draws_per_s']:>10.3f} {v['forwards_per_s']:>11.2f} {v['unet_forwards_per_draw']:>8.1f} "
                     f"{tflops:>8} {mfu:>6}  batch {v['batch_size_images']} images, early majority {v['early_majority']}, "
                     f"{v['precision']}, channels_last={v['channels_last']}, compile={v['compile']}{ratio}")
        lines.append(f"{'':<16} seconds: {v['seconds']}")
    if "ratio" in r:
        lines.append(f"\nratio engine/reference draws/s: {r['ratio']:.2f}x (per repeat: {r['ratio_per_repeat']})")
    if "early_majority_ratio" in r:
        lines.append(f"early majority: {r['early_majority_ratio']:.2f}x draws/s over every vote computed "
                     f"(per repeat: {r['early_majority_ratio_per_repeat']}), {100 * r['votes_computed_share']:.1f}% of votes computed, "
                     f"counts equal: {r['counts_equal_with_all_votes']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(dump(result) if args.json else format_table(result), flush=True)


if __name__ == "__main__":
    main()
