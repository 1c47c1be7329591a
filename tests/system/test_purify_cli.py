"""``densepure purify`` through the real command line: image inputs, JPEG grids, classifier
labels, and one-line errors that name the actual problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def densepure(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=180, cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    err = result.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def digit(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, Path, Path]:
    """Held-out digit 0 as a (1,8,8) array, a .npy file and a grey 8-bit PNG of the same pixels."""
    from workers.data import load_dataset

    image = load_dataset("digits").get(0)[0]
    image = np.round(image * 255) / 255  # what an 8-bit PNG can hold
    folder = tmp_path_factory.mktemp("img")
    np.save(folder / "digit.npy", image.astype(np.float32))
    Image.fromarray((image[0] * 255).round().astype(np.uint8), mode="L").save(folder / "digit.png")
    return image.astype(np.float32), folder / "digit.npy", folder / "digit.png"


def _purify(inp: Path, out: Path, *extra: str, denoiser: list[str] | None = None) -> subprocess.CompletedProcess:
    return densepure("purify", *(denoiser or ["--denoiser", "digits"]), "--sigma", "0.5", "--steps", "2",
                     "--samples", "3", "--seed", "1", "--input", str(inp), "--output", str(out), "--device", "cpu", *extra)


def test_a_grey_png_is_read_as_one_channel_like_the_npy(tmp_path: Path, digit) -> None:
    _, npy, png = digit
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert _purify(npy, a).returncode == 0
    result = _purify(png, b)
    assert result.returncode == 0, result.stderr
    assert np.load(b).shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(np.load(a), np.load(b))  # same pixels, same seeds: same samples


def test_jpeg_grid_with_classifier_labels(tmp_path: Path, digit) -> None:
    from workers.models import load_classifier

    _, npy, _ = digit
    out, grid = tmp_path / "s.npy", tmp_path / "grid.jpg"
    result = _purify(npy, out, "--grid", str(grid), "--classifier", "digits")
    assert result.returncode == 0, result.stderr
    with Image.open(grid) as picture:
        assert picture.format == "JPEG" and picture.size[0] > 100
    assert grid.read_bytes()[:3] == b"\xff\xd8\xff"
    clf = load_classifier("digits")
    with torch.no_grad():
        labels = clf(torch.as_tensor(np.load(out))).argmax(1).tolist()
    line = next(line for line in result.stdout.splitlines() if line.startswith("classifier digits:"))
    assert line.endswith("samples " + ", ".join(map(str, labels))), line
    png = tmp_path / "grid.png"
    assert _purify(npy, tmp_path / "t.npy", "--grid", str(png)).returncode == 0
    with Image.open(png) as picture:
        assert picture.format == "PNG"


def test_unsupported_grid_format_is_refused_before_any_work(tmp_path: Path, digit) -> None:
    _, npy, _ = digit
    out = tmp_path / "s.npy"
    assert_one_line_error(_purify(npy, out, "--grid", str(tmp_path / "grid.gif")), "grid.gif", ".png", ".jpg")
    assert_one_line_error(_purify(npy, out, "--grid", str(tmp_path / "no" / "grid.png")), "does not exist")
    assert not out.exists()


def test_a_text_file_named_npy_is_not_an_array_or_an_image(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.npy"
    bogus.write_text("this is not an array\n")
    err = assert_one_line_error(_purify(bogus, tmp_path / "s.npy"), f"cannot read {bogus} as a .npy array or an image")
    assert "pickle" not in err.lower()


@pytest.fixture(scope="module")
def rgb_denoiser(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A tiny 3-channel 8x8 OpenAI UNet (random weights) with its flags file."""
    from safetensors.torch import save_file

    from workers.digits import DIGITS_UNET_FLAGS
    from workers.unet import build_openai_unet

    folder = tmp_path_factory.mktemp("rgb")
    flags = {**DIGITS_UNET_FLAGS, "in_channels": 3}
    net = build_openai_unet(flags)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "rgb.safetensors"))
    (folder / "flags.json").write_text(json.dumps(flags))
    return ["--denoiser", f"openai:{folder / 'rgb.safetensors'}", "--model-flags", str(folder / "flags.json")]


def test_channel_mismatches_say_channels_not_resolution(tmp_path: Path, digit, rgb_denoiser) -> None:
    _, _, png = digit
    assert_one_line_error(_purify(png, tmp_path / "s.npy", denoiser=rgb_denoiser),
                          f"{png} has 1 channel but the denoiser takes 3", "RGB")
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(rgb)
    assert_one_line_error(_purify(rgb, tmp_path / "s.npy"), "has 3 channels but the denoiser takes 1")
    big = tmp_path / "big.png"
    Image.new("L", (16, 16), 7).save(big)
    assert_one_line_error(_purify(big, tmp_path / "s.npy"), "(1, 16, 16)", "(1, 8, 8)", "resize it to 8x8")
    # An RGB image of the right size goes through the RGB denoiser.
    ok = _purify(rgb, tmp_path / "rgb.npy", denoiser=rgb_denoiser)
    assert ok.returncode == 0, ok.stderr
    assert np.load(tmp_path / "rgb.npy").shape == (3, 3, 8, 8)
