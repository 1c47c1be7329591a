"""Shared pieces of the speed benchmarks: models of the real architectures, the stand-in
classifier, device facts (name, peak FLOP/s) and small timing helpers.

The speed of the certification loop is the speed of the diffusion UNet, and that depends on the
architecture, not on the weights. So ``cifar10`` and ``imagenet`` build the real OpenAI UNets
from the flags in the checkpoint manifests in ``configs/checkpoints/`` (the checkpoints DensePure
uses) with random weights, and check the parameter count against the manifests. ``digits`` uses the
bundled demo models when they are there (random weights of the same architecture otherwise).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from workers.classifier import Classifier  # noqa: E402
from workers.denoiser import Denoiser  # noqa: E402
from workers.unet_flags import diffusion_settings, unet_flags_from_json  # noqa: E402
from workers.unet import build_openai_unet  # noqa: E402

MODELS = ("cifar10", "imagenet", "digits")


@dataclass(frozen=True)
class ModelFacts:
    """What a benchmark needs to know about one model of the paper protocol.

    ``manifest``: the checkpoint manifest in ``configs/checkpoints/`` (flags, parameter count and
    ``forward_flops_per_image``, counted with torch.utils.flop_counter at batch 1, multiply-add =
    2 FLOPs). ``reference_batch`` is the reference code's ``--certified_batch``
    (run_scripts/densepure_{cifar10,imagenet}.sh); ``reference_fp16`` says whether the reference
    runs the UNet torso in fp16 on GPU (guided-diffusion's ``use_fp16: True`` in DensePure's
    configs/imagenet.yml; the improved-diffusion CIFAR-10 model has no such option: fp32).
    """

    name: str
    manifest: str | None
    num_classes: int
    reference_batch: int
    reference_fp16: bool

    def _read(self) -> dict[str, Any]:
        return {} if self.manifest is None else _manifest(self.manifest)

    @property
    def num_parameters(self) -> int | None:
        return self._read().get("num_parameters")

    @property
    def flops_per_forward(self) -> float | None:
        return self._read().get("forward_flops_per_image")


@functools.cache
def _manifest(path: str) -> dict[str, Any]:
    """A checkpoint manifest, parsed once (the ImageNet one has 4400 lines)."""
    return json.loads((REPO / path).read_text())


FACTS: dict[str, ModelFacts] = {
    "cifar10": ModelFacts("cifar10", "configs/checkpoints/improved-diffusion_cifar10_uncond_50M_500K.json", 10, 100, False),
    "imagenet": ModelFacts("imagenet", "configs/checkpoints/guided-diffusion_256x256_uncond.json", 1000, 16, True),
    # The digits demo has no reference run; 100 draws per batch as for CIFAR-10 (small images).
    "digits": ModelFacts("digits", None, 10, 100, False),
}

# Dense bf16 (= fp16) tensor-core peak in FLOP/s, by a substring of torch.cuda.get_device_name().
# First match wins, so the specific names come first. Override with --peak-tflops.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM (HBM3)
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of ``device_name`` (None when unknown and not overridden)."""
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_FLOPS:
        if key in device_name:
            return value
    return None


class PooledLinear(nn.Module):
    """The stand-in classifier of the speed runs: 4x4 average pooling, then one linear layer.

    DensePure's real classifiers (ViT-B/16 at 224 for CIFAR-10, BEiT-L/16 at 512 for ImageNet)
    are outside this issue, which is about the UNet; a cheap classifier keeps the comparison about
    the diffusion loop. The engine and the reference loop get the very same instance.
    """

    def __init__(self, channels: int, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.fc = nn.Linear(channels * 16, num_classes)
        with torch.no_grad():
            self.fc.weight.normal_(0.0, 0.5, generator=generator)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Give the layers that OpenAI zero-initialises (residual outputs, the final conv) random
    weights too, so that the network does not start as a near-identity with eps = 0: the work is
    the same either way, but the purified images and labels are then not trivially constant."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                fan_in = p[0].numel()
                p.normal_(0.0, 0.5 / fan_in**0.5, generator=generator)


def openai_denoiser(flags: dict[str, Any], seed: int = 0) -> Denoiser:
    """A ``Denoiser`` of the architecture ``flags`` describe, with seeded random weights."""
    gen = torch.Generator().manual_seed(seed)
    net = build_openai_unet(flags)
    _randomize(net, gen)
    return Denoiser.from_openai(net.requires_grad_(False), diffusion_settings(flags)).eval()


def load_models(model: str, seed: int = 0) -> tuple[Classifier, Denoiser, str]:
    """(classifier, denoiser, description of the classifier) for a benchmark model name."""
    facts = FACTS[model]
    if model == "digits":
        return _digits_models(seed)
    assert facts.manifest is not None
    flags = unet_flags_from_json(REPO / facts.manifest)
    denoiser = openai_denoiser(flags, seed)
    params = sum(p.numel() for p in denoiser.parameters())
    if params != facts.num_parameters:
        raise RuntimeError(f"{model}: built {params} parameters, the checkpoint has {facts.num_parameters}: flags drifted")
    gen = torch.Generator().manual_seed(seed + 1)
    classifier = Classifier(PooledLinear(denoiser.in_channels, facts.num_classes, gen), facts.num_classes).eval()
    what = f"stand-in: 4x4 average pool + Linear({denoiser.in_channels * 16}, {facts.num_classes}), random weights"
    return classifier, denoiser, what


def _digits_models(seed: int) -> tuple[Classifier, Denoiser, str]:
    """The bundled digits demo models, or random weights of their architectures if not trained yet."""
    from workers.errors import UserError
    from workers.digits import DIGITS_UNET_FLAGS, DigitsCNN
    from workers.models import load_classifier, load_denoiser

    try:
        return load_classifier("digits"), load_denoiser("digits"), "bundled digits CNN (workers/assets/digits)"
    except UserError as exc:
        warnings.warn(f"{exc}; using random weights of the same architectures (same speed)", stacklevel=2)
    gen = torch.Generator().manual_seed(seed + 1)
    cnn = DigitsCNN()
    _randomize(cnn, gen)
    return Classifier(cnn.eval(), 10), openai_denoiser(dict(DIGITS_UNET_FLAGS), seed), "digits CNN architecture, random weights"


def benchmark_image(model: str, denoiser: Denoiser, seed: int = 0) -> torch.Tensor:
    """The image every draw starts from: the first held-out digit, or a seeded random image."""
    if model == "digits":
        from workers.data import load_digits_heldout

        image, _ = load_digits_heldout().get(0)
        return torch.as_tensor(image, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 2)
    return torch.rand(denoiser.in_channels, denoiser.image_size, denoiser.image_size, generator=gen)


def cpu_model() -> str:
    """lscpu's model name and the core count this process may use."""
    name = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> float:
    return os.getloadavg()[0]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def env_facts() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
    }


def dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True)
