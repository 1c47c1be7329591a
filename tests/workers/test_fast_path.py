"""The engine's fast path decides like its plain fp32 path (no timing assertions).

Fast path on CPU: channels_last memory format and bf16 autocast (on CUDA the same settings are
the defaults of ``benchmarks/gpu.sh``). Same seeds on both sides, so the only difference is
arithmetic: the base decisions (majority of K = 4 purified copies, b = 2) of 20 held-out digits
x 50 draws must agree on at least 99.5% of the draws. The measured agreement is printed
(``pytest -s``) and recorded in BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from workers.digits import ASSET_DIR, CLASSIFIER_FILE, DENOISER_FILE
from workers.engine import Engine, cpu_batch_size, fit_batch, majority_votes
from workers.purify import PurifySpec

IMAGES, DRAWS, VOTES, STEPS, SIGMA = 20, 50, 4, 2, 0.25

needs_digits = pytest.mark.skipif(
    not all((Path(ASSET_DIR) / f).is_file() for f in (DENOISER_FILE, CLASSIFIER_FILE)),
    reason="the digits demo models are not trained (python scripts/train_digits.py)",
)


def _decisions(engine: Engine, images: torch.Tensor, spec: PurifySpec, seeds: list[list[int]]) -> torch.Tensor:
    """(images, draws) base decisions: purify with the engine, classify, majority of the K votes."""
    out = []
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(engine.precision)
    for image, image_seeds in zip(images, seeds):
        copies = engine.purify(image, spec, image_seeds)  # (draws, K, C, H, W)
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = engine.classifier(copies.flatten(0, 1))
        labels = logits.float().argmax(dim=1).view(len(image_seeds), spec.votes)
        out.append(majority_votes(labels, [spec.votes], engine.num_classes)[0])
    return torch.stack(out)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: with two on a 2-core machine that another process keeps busy, every
    parallel region waits for a descheduled thread and this test took 100 s instead of 10."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_digits
def test_fast_path_agrees_with_fp32(one_thread: None) -> None:
    from workers.data import load_digits_heldout
    from workers.seeds import draw_seeds
    from workers.models import load_classifier, load_denoiser

    data = load_digits_heldout()
    images = torch.stack([torch.as_tensor(data.get(i)[0]) for i in range(IMAGES)])
    seeds = [draw_seeds(7, i, SIGMA, "estimate", 0, DRAWS).tolist() for i in range(IMAGES)]
    spec = PurifySpec("densepure", SIGMA, STEPS, VOTES)

    plain = Engine(load_classifier("digits"), load_denoiser("digits"), "cpu", precision="fp32", channels_last=False)
    fast = Engine(load_classifier("digits"), load_denoiser("digits"), "cpu", precision="bf16", channels_last=True)
    a = _decisions(plain, images, spec, seeds)
    b = _decisions(fast, images, spec, seeds)
    agreement = (a == b).float().mean().item()
    print(f"fast path (channels_last + bf16 autocast) vs fp32: {agreement:.4f} of {a.numel()} base decisions agree")
    assert agreement >= 0.995

    # The plain path is deterministic: the same seeds give bit-identical purifications.
    again = plain.purify(images[0], spec, seeds[0][:8])
    assert torch.equal(again, plain.purify(images[0], spec, seeds[0][:8]))


def test_cuda_batch_size_from_memory_probes() -> None:
    """The automatic CUDA batch size: constant + slope x images, fitted to a share of free memory."""
    gib = 2.0**30
    # 1 GiB of workspaces and weight copies + 0.5 GiB per image, 80 GiB free, 80% usable.
    probes = [(2, 1 * gib + 2 * 0.5 * gib), (6, 1 * gib + 6 * 0.5 * gib)]
    assert fit_batch(probes, 80 * gib) == int((0.8 * 80 - 1) / 0.5)
    assert fit_batch(probes, 80 * gib, cap=64) == 64
    assert fit_batch(probes, 0.1 * gib) == 1  # nothing fits: still one image at a time
    # Equal peaks (allocator rounding): the whole peak is charged per image.
    assert fit_batch([(2, 6 * gib), (6, 6 * gib)], 80 * gib) == int(0.8 * 80 / 1.0)
    # CPU: the measured defaults, by image size (16 CIFAR-10 images, 512 digits, 1 ImageNet image).
    assert [cpu_batch_size(s) for s in [(3, 32, 32), (1, 8, 8), (3, 256, 256)]] == [16, 512, 1]
    eng = Engine(None, None, "cpu")
    assert eng.batch_size is None and eng._ensure_batch_size((3, 32, 32)) == 16 and eng.batch_size == 16


def test_compiled_engine_runs_and_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True used to crash on the first batch (dynamo guards on the Denoiser's numpy
    schedule fail under inference_mode). Dynamo's eager backend keeps this test fast: the
    guard failure happened in dynamo itself, whatever the backend."""
    import functools

    from tests.fixtures.models import ToyClassifier, tiny_denoiser
    from workers.classifier import Classifier

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    spec = PurifySpec("densepure", 0.5, steps=2, votes=3)
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3))
    den = tiny_denoiser(learn_sigma=True)
    eager = Engine(Classifier(ToyClassifier(), 3), den, batch_size=12)
    compiled = Engine(Classifier(ToyClassifier(), 3), den, batch_size=12, compile=True)
    seeds = list(range(9))
    torch.testing.assert_close(compiled.purify(image, spec, seeds), eager.purify(image, spec, seeds), rtol=1e-5, atol=1e-5)
    assert compiled.count(image, spec, seeds).counts.sum() == 9


def test_auto_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` is bf16 on CPUs with native bf16, fp32 on others; explicit choices pass through."""
    import workers.engine as engine_module
    from workers.engine import resolve_precision

    for native, expected in [(True, "bf16"), (False, "fp32")]:
        monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", "cpu") == expected
        assert Engine(None, None, "cpu").precision == expected
        assert Engine(None, None, "cpu", precision="fp16").precision == "fp16"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")
