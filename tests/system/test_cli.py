"""The command line as a user meets it: one-line errors with exit status 2, nothing left behind,
and ``densepure purify`` on the bundled denoiser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.digits import DIGITS_UNET_FLAGS
from workers.unet import build_openai_unet

REPO = Path(__file__).resolve().parents[2]


def densepure(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=cwd or REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def wrong_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of another architecture (num_channels 64) next to the digits flags."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "other.safetensors"
    net = build_openai_unet({**DIGITS_UNET_FLAGS, "num_channels": 64})
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--sigmas", "0"], ["sigma must be a positive number", "--sigmas"]),
        (["--sigmas", "-0.5"], ["sigma must be a positive number"]),
        (["--n0", "0"], ["--n0"]),
        (["--n", "0"], ["--n "]),
        (["--n0", "200", "--n", "100"], ["--n0 200 is larger than --n 100"]),
        (["--alpha", "1.5"], ["--alpha"]),
        (["--alpha", "0"], ["--alpha"]),
        (["--votes", "0"], ["votes"]),
        (["--steps", "0"], ["steps"]),
        (["--methods", "magic"], ["unknown method 'magic'"]),
        (["--sigmas", "0.012", "--steps", "10"], ["sigma 0.012 with --steps 10", "use --steps <= 3"]),
        (["--sigmas", "0.003"], ["sigma 0.003", "pure noise"]),
        (["--steps", "2000"], ["--steps 2000 exceeds"]),
        (["--sigmas", "0.25,0.2500001"], ["more than once"]),
        (["--sampling", "sequential"], ["needs --radii"]),
        (["--sampling", "sequential", "--radii", "0.5,0.25"], ["sorted ascending"]),
        (["--sampling", "sequential", "--radii", "-1"], [">= 0"]),
        (["--sampling", "sequential", "--radii", "0.25,0.25"], ["twice"]),
        (["--sampling", "sequential", "--radii", "0.5", "--n0", "10", "--n", "30"], ["radius 0.5 cannot be certified", "needs --n >="]),
        (["--sampling", "sequential", "--radii", "0.1", "--n0", "10", "--n", "100"], ["--first-look 100 is not below --n 100", "fixed sampling"]),
        (["--sampling", "sequential", "--radii", "0.25", "--first-look", "5000", "--n", "5000"], ["--first-look 5000 is not below --n 5000"]),
        (["--sampling", "sequential", "--radii", "0.25", "--futility", "0"], ["--futility must lie strictly between 0 and 1"]),
        (["--sampling", "sequential", "--radii", "0.25", "--futility", "1"], ["--futility must lie strictly between 0 and 1"]),
        (["--sampling", "magic"], ["--sampling"]),
        (["--radii", "0.5"], ["only applies to --sampling sequential"]),
        (["--every", "0"], ["--every must be >= 1, got 0"]),
        (["--data", "cifar10:/nope/test_batch"], ["/nope/test_batch"]),
        (["--classifier", "hf:/nope"], ["/nope"]),
        (["--denoiser", "openai:/nope.pt", "--model-flags", "/nope.json"], ["/nope"]),
    ],
)
def test_certify_rejects_bad_input_in_one_line_and_writes_nothing(tmp_path, args, needles):
    """In-process (click's runner) for speed; the same command and error path as a subprocess,
    which ``test_bad_input_in_a_subprocess`` checks for a few of these cases."""
    from click.testing import CliRunner

    from pipeline.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["certify", "--out", str(out), "--no-progress", *args])
    assert result.exit_code == 2, (result.output, result.exception)
    err = result.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("args, needles", [
    (["--sigmas", "0"], ["sigma must be a positive number"]),
    (["--data", "cifar10:/nope/test_batch"], ["/nope/test_batch"]),
    (["--sigmas", "0.012", "--steps", "10"], ["use --steps <= 3"]),
])
def test_bad_input_in_a_subprocess(tmp_path, args, needles):
    out = tmp_path / "run"
    assert_one_line_error(densepure("certify", "--out", str(out), "--no-progress", *args), *needles)
    assert not out.exists()


def test_wrong_checkpoint_for_the_flags_is_named(tmp_path, wrong_checkpoint):
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps(DIGITS_UNET_FLAGS))
    out = tmp_path / "run"
    result = densepure("certify", "--out", str(out), "--denoiser", f"openai:{wrong_checkpoint}", "--model-flags", str(flags))
    assert_one_line_error(result, str(wrong_checkpoint))
    assert not out.exists()


def test_yaml_config_supplies_options_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("n0: 0\nsigmas: [0.25, 0.5]\n")
    assert_one_line_error(densepure("certify", "--config", str(config), "--out", str(tmp_path / "r")), "--n0")
    config.write_text("n0: 0\nbogus: 1\n")
    bad = densepure("certify", "--config", str(config), "--out", str(tmp_path / "r"))
    assert bad.returncode == 2 and "bogus" in bad.stderr


def test_help_lists_the_options():
    result = densepure("certify", "--help")
    assert result.returncode == 0
    for option in ("--config", "--data", "--denoiser", "--model-flags", "--classifier", "--votes", "--max-workers"):
        assert option in result.stdout


@pytest.fixture(scope="module")
def digit(tmp_path_factory) -> Path:
    from workers.data import load_dataset

    image, _ = load_dataset("digits").get(0)
    path = tmp_path_factory.mktemp("img") / "digit.npy"
    np.save(path, image)
    return path


@pytest.mark.parametrize("steps", [1, 3])
def test_purify_writes_samples_and_a_grid(tmp_path, digit, steps):
    out, grid = tmp_path / "out.npy", tmp_path / "grid.png"
    result = densepure("purify", "--denoiser", "digits", "--sigma", "0.5", "--steps", str(steps), "--samples", "5",
                       "--seed", "3", "--input", str(digit), "--output", str(out), "--grid", str(grid), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    samples = np.load(out)
    assert samples.shape == (5, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    assert len({s.tobytes() for s in samples}) == 5  # each sample its own noise
    assert "PSNR" in result.stdout and Image.open(grid).size[0] > 100
    again = densepure("purify", "--denoiser", "digits", "--sigma", "0.5", "--steps", str(steps), "--samples", "5",
                      "--seed", "3", "--input", str(digit), "--output", str(tmp_path / "again.npy"), "--device", "cpu")
    assert again.returncode == 0 and np.array_equal(np.load(tmp_path / "again.npy"), samples)


def test_purify_is_one_shot_at_one_step(tmp_path, digit):
    """--steps 1 is Carlini's one-shot denoiser: the same as DDS on the same noise."""
    from workers.seeds import draw_seeds
    from workers.engine import Engine
    from workers.models import load_denoiser
    from workers.purify import PurifySpec

    out = tmp_path / "out.npy"
    result = densepure("purify", "--denoiser", "digits", "--sigma", "0.25", "--steps", "1", "--samples", "2",
                       "--input", str(digit), "--output", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    engine = Engine(None, load_denoiser("digits"))
    expected = engine.purify(np.load(digit), PurifySpec("dds", 0.25), draw_seeds(0, 0, 0.25, "purify", 0, 2))[:, 0]
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected)


@pytest.mark.parametrize(
    "setup, needles",
    [
        (lambda p: np.save(p, np.zeros((1, 9, 9), np.float32)), ["shape (1, 9, 9)", "(1, 8, 8)"]),
        (lambda p: np.save(p, np.zeros((8, 8), np.float32)), ["(C,H,W)"]),
        (lambda p: np.save(p, np.full((1, 8, 8), 2.0, np.float32)), ["[0,1]"]),
        (lambda p: p.write_bytes(b"not numpy"), ["cannot read"]),
        (lambda p: None, ["not found"]),
    ],
)
def test_purify_rejects_bad_images(tmp_path, setup, needles):
    image, out = tmp_path / "in.npy", tmp_path / "out.npy"
    setup(image)
    result = densepure("purify", "--denoiser", "digits", "--sigma", "0.5", "--input", str(image), "--output", str(out))
    assert_one_line_error(result, *needles)
    assert not out.exists()


@pytest.mark.parametrize("flag, value, needle", [("--sigma", "0", "--sigma"), ("--steps", "0", "--steps"), ("--samples", "0", "--samples")])
def test_purify_rejects_bad_flags(tmp_path, digit, flag, value, needle):
    args = {"--sigma": "0.5", "--steps": "1", "--samples": "2", flag: value}
    out = tmp_path / "out.npy"
    flat = [x for kv in args.items() for x in kv]
    result = densepure("purify", "--denoiser", "digits", *flat, "--input", str(digit), "--output", str(out))
    assert_one_line_error(result, needle)
    assert not out.exists()
