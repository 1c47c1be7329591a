"""UNet forward throughput by batch size, memory format and precision: how the engine's CPU
defaults (batch size, channels_last) were chosen.

    python benchmarks/bench_unet_batch.py --model cifar10 [--batches 8,16,32,64,128] [--precision fp32,bf16]

For each (batch, channels_last on/off, precision) the network runs enough forwards for about
``--images`` images, in ``--rounds`` interleaved rounds (so that load changes hit every setting
alike) after one untimed forward per setting; the best and the median round are reported, in
images per second.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import MODELS, dump, env_facts, load_average, load_models, median  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="cifar10")
    p.add_argument("--batches", default="8,16,32,64,128")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--images", type=int, default=128, help="images per timed round and setting")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    _, denoiser, _ = load_models(args.model)
    nets = {False: denoiser.net, True: copy.deepcopy(denoiser.net).to(memory_format=torch.channels_last)}
    shape = (denoiser.in_channels, denoiser.image_size, denoiser.image_size)
    t_value = denoiser.schedule.T / 2 * (1000.0 / denoiser.schedule.T)
    settings = [(b, cl, prec) for b in map(int, args.batches.split(",")) for cl in (False, True) for prec in args.precision.split(",")]
    rates: dict[tuple[int, bool, str], list[float]] = {s: [] for s in settings}
    load_before = load_average()
    with torch.inference_mode():
        for rnd in range(args.rounds):
            for batch, cl, prec in settings:
                x = torch.randn(batch, *shape)
                t = torch.full((batch,), t_value)
                calls = max(1, args.images // batch)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                    if rnd == 0:
                        nets[cl](x, t)
                    start = time.perf_counter()
                    for _ in range(calls):
                        nets[cl](x, t)
                    rates[(batch, cl, prec)].append(batch * calls / (time.perf_counter() - start))
    result = {
        "model": args.model,
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(load_average(), 2),
        **env_facts(),
        "rows": [{"batch": b, "channels_last": cl, "precision": prec, "images_per_s_median": median(v),
                  "images_per_s_best": max(v), "rounds": [round(r, 2) for r in v]} for (b, cl, prec), v in rates.items()],
    }
    if args.json:
        print(dump(result))
        return
    print(f"{args.model} UNet forward on {result['cpu']}, torch {result['torch']}, {result['threads']} threads; "
          f"load {result['load_avg_1min_before']} -> {result['load_avg_1min_after']}")
    print(f"{'batch':>6} {'layout':>14} {'precision':>9} {'img/s median':>13} {'best':>8}")
    for row in result["rows"]:
        layout = "channels_last" if row["channels_last"] else "NCHW"
        print(f"{row['batch']:>6} {layout:>14} {row['precision']:>9} {row['images_per_s_median']:>13.2f} {row['images_per_s_best']:>8.2f}")


if __name__ == "__main__":
    main()
