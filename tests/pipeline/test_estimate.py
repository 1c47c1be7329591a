"""``pipeline.estimate`` and ``densepure certify --dry-run``: the plan's numbers, nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.estimate import (
    CHECKPOINT_MANIFESTS,
    DEFAULT_TFLOPS,
    NetworkFlops,
    estimate,
    format_estimate,
    measure_flops,
    unet_flops,
)
from pipeline.plan import plan_units

REPO = Path(__file__).resolve().parents[2]

# Three methods, two sigmas, K in {1, 3}, b = 3, chunks that do not divide n.
OPTIONS = dict(data="digits", denoiser="digits", classifier="digits", methods=["cohen", "dds", "densepure"],
               sigmas=[0.25, 0.5], votes=[1, 3], steps=3, n0=7, n=50, alpha=0.01, max_images=4, every=3, chunk=20)
ARGS = ["--methods", "cohen,dds,densepure", "--sigmas", "0.25,0.5", "--votes", "1,3", "--steps", "3", "--n0", "7",
        "--n", "50", "--alpha", "0.01", "--max", "4", "--every", "3", "--chunk", "20", "--no-progress"]


def _images() -> list[tuple[int, int]]:
    from workers.data import load_dataset

    ds = load_dataset("digits")
    return [(i, ds.label(i)) for i in range(0, 12, 3)]


def _expected(config: RunConfig, images: list[tuple[int, int]]) -> dict[str, tuple[int, int, int, int]]:
    """Per method: (units, draws, UNet forwards, classifier calls), from the plan and the rules
    written out by hand (K = max votes = 3, b = 3)."""
    units = plan_units(config, images)
    out = {}
    for method in config.methods:
        mine = [u for u in units if u.method == method]
        draws = sum(u.num_draws for u in mine)
        unet = {"cohen": 0, "dds": draws, "densepure": draws * (1 + 3 * (3 - 1))}[method]
        calls = draws * 3 if method == "densepure" else draws
        out[method] = (len(mine), draws, unet, calls)
    return out


def test_estimate_counts_are_the_plans() -> None:
    config = RunConfig(out="unused", **OPTIONS)
    images = _images()
    est = estimate(config, images, unet=NetworkFlops(10.0, "test"), classifier=NetworkFlops(1.0, "test"))
    want = _expected(config, images)
    assert {m.method: (m.units, m.draws, m.unet_forwards, m.classifier_calls) for m in est.methods} == want
    assert est.units == len(plan_units(config, images)) == 4 * 2 * 3 * (1 + 3)
    assert est.draws == 4 * 2 * 3 * (7 + 50)
    assert est.flops == est.unet_forwards * 10.0 + est.classifier_calls * 1.0
    assert est.gpu_hours == pytest.approx(est.flops / (DEFAULT_TFLOPS * 1e12) / 3600)
    assert "total" in format_estimate(est)


def test_the_engine_reports_the_estimated_evaluations() -> None:
    """One unit per method through the real engine with every vote computed: its record's counts
    are the estimate's (early majority and sequential sampling can only lower them)."""
    from workers.contract import ModelSpec
    from workers.data import load_dataset
    from workers.worker import build_engine, run_units

    config = RunConfig(out="unused", **OPTIONS)
    images = _images()[:1]
    units = [u for u in plan_units(config, images) if u.phase == "select" and u.sigma == 0.25]
    engine = build_engine(ModelSpec(dataset="digits", classifier="digits", denoiser="digits", device="cpu",
                                    precision="fp32", batch_size=64, early_majority=False))
    image = load_dataset("digits").get(images[0][0])[0]
    for unit in units:
        [record] = run_units(engine, lambda _: image, [unit])
        est = estimate(RunConfig(out="unused", **{**OPTIONS, "methods": [unit.method], "sigmas": [0.25], "n": 7}), images)
        select = next(m for m in est.methods)
        # The estimate covers both phases of equal size here (n0 = n = 7): half of it is this unit.
        assert (record.unet_forwards, record.classifier_calls) == (select.unet_forwards // 2, select.classifier_calls // 2)


def _numbers(line: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(r"(?<![\w.])\d[\d,]*(?![\w.])", line)]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["certify", "--out", str(out), "--dry-run", *ARGS])
    assert result.exit_code == 0, result.output
    assert not out.exists() and _tree(tmp_path) == before  # no run folder, no probe file, nothing
    config = RunConfig(out=str(out), **OPTIONS)
    want = _expected(config, _images())
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for method, numbers in want.items():
        assert tuple(_numbers(lines[method])[:4]) == numbers, lines[method]
    totals = [sum(v[i] for v in want.values()) for i in range(4)]
    assert _numbers(lines["total"])[:4] == totals
    assert "GPU-hours" in result.stdout and f"{DEFAULT_TFLOPS:g} sustained TFLOP/s" in result.stdout


def test_dry_run_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for extra, needle in ((["--classifier", "hf:/nope"], "/nope"), (["--sigmas", "0"], "sigma"),
                          (["--data", "parquet:/nope.parquet"], "/nope.parquet")):
        result = CliRunner().invoke(main, ["certify", "--out", str(out), "--dry-run", *ARGS, *extra])
        assert result.exit_code == 2, result.output
        err = result.stderr.strip()
        assert err.startswith("error:") and err.count("\n") == 0 and needle in err, err
    bad = CliRunner().invoke(main, ["certify", "--out", str(out), "--dry-run", "--assume-tflops", "0", *ARGS])
    assert bad.exit_code == 2 and "--assume-tflops" in bad.stderr
    assert not out.exists()


def test_paper_unets_take_the_manifests_flops_and_the_counter_agrees() -> None:
    """The CIFAR-10 flags file resolves to its manifest; counting our UNet for those flags (on
    the meta device: no compute) gives the manifest's own number."""
    from workers.unet import build_openai_unet
    from workers.unet_flags import unet_flags_from_json

    flags_file = REPO / "configs" / "cifar10_uncond_50M_500K.flags.json"
    manifest = json.loads((CHECKPOINT_MANIFESTS / "improved-diffusion_cifar10_uncond_50M_500K.json").read_text())
    known = unet_flops(None, str(flags_file))
    assert known.flops == manifest["forward_flops_per_image"]
    assert known.source == "configs/checkpoints/improved-diffusion_cifar10_uncond_50M_500K.json"
    with torch.device("meta"):
        net = build_openai_unet(unet_flags_from_json(flags_file))
    x, t = torch.zeros(1, 3, 32, 32), torch.tensor([500])
    assert measure_flops(net, x, t) == manifest["forward_flops_per_image"]


def test_torchscript_is_counted_on_the_cpu() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)).eval()
    x = torch.zeros(1, 1, 8, 8)
    want = 2 * (4 * 9 * 36) + 2 * (144 * 10)  # multiply-adds of the conv and the linear layer, x2
    assert measure_flops(net, x) == want
    assert measure_flops(torch.jit.script(net), x) == want
