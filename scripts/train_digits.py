"""Train the bundled digits demo models and write them to workers/assets/digits/.

Two models, both on the first 1500 scikit-learn digits (see workers/digits.py for the split):

- the denoiser: OpenAI's UNet (``DIGITS_UNET_FLAGS``) trained as a DDPM epsilon predictor on the
  linear schedule (betas 1e-4..0.02, T = 1000), images mapped to [-1, 1]; the EMA of the weights
  is what gets saved;
- the classifier: ``DigitsCNN`` trained on clean digits. Noise augmentation exists but is off by
  default, because the demo compares Cohen et al. (this same classifier on noisy inputs) with
  diffusion purification in front of it, and a noise-trained classifier would blur that contrast.

Every random draw (initial weights, batches, timesteps, noise) comes from explicit
``torch.Generator`` objects seeded from ``--seed``; the global RNG is never touched.

Usage (from the repository root)::

    python scripts/train_digits.py                # defaults: 3000 denoiser steps, 30 epochs
    python scripts/train_digits.py --steps 200 --classifier-epochs 2 --out-dir /tmp/digits
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Allow ``python scripts/train_digits.py`` from a checkout without installing the package.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from safetensors.torch import save_file  # noqa: E402

from workers.digits import (  # noqa: E402
    ASSET_DIR,
    CLASSIFIER_FILE,
    DENOISER_FILE,
    DENOISER_FLAGS_FILE,
    DIGITS_UNET_FLAGS,
    NUM_TRAIN,
    SPLIT_SEED,
    DigitsCNN,
    load_digits_data,
)
from workers.schedule import NoiseSchedule  # noqa: E402
from workers.unet_flags import diffusion_settings  # noqa: E402
from workers.unet import build_openai_unet  # noqa: E402


@dataclass(frozen=True)
class DenoiserTrainConfig:
    """Hyper-parameters of the DDPM training run."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    num_res_blocks: int = int(DIGITS_UNET_FLAGS["num_res_blocks"])


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Hyper-parameters of the classifier training run."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    noise_std: float = 0.0  # Gaussian augmentation in [0, 1] pixel units; 0 = clean training


def seeded_init_(model: nn.Module, generator: torch.Generator) -> None:
    """Re-draw PyTorch's default init for every conv/linear layer from ``generator``.

    Module constructors draw from the global RNG; redrawing here makes the run depend only on
    ``--seed``. The bound 1/sqrt(fan_in) is what PyTorch's default (kaiming-uniform with a=sqrt(5))
    amounts to, for weights and biases alike. Layers that start all-zero are the UNet's deliberately
    zero-initialised residual outputs and stay zero.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                if not module.weight.any():
                    continue
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(generator=generator)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _eps_mse(
    model: nn.Module,
    x01: torch.Tensor,
    abar: torch.Tensor,
    t_values: list[int],
    time_scale: float,
    generator: torch.Generator,
) -> dict[int, float]:
    """Held-out epsilon MSE at a few fixed timesteps (same noise for every model evaluated)."""
    x0 = 2 * x01 - 1
    out: dict[int, float] = {}
    with torch.no_grad():
        for t in t_values:
            eps = torch.randn(x0.shape, generator=generator)
            a = abar[t]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            pred = model(xt, torch.full((x0.shape[0],), t * time_scale))
            out[t] = F.mse_loss(pred, eps).item()
    return out


def train_denoiser(
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    cfg: DenoiserTrainConfig,
    seed: int,
    log_every: int = 250,
) -> tuple[nn.Module, dict[str, object]]:
    """DDPM training (uniform t, epsilon MSE); returns the EMA model and a summary."""
    flags = {**DIGITS_UNET_FLAGS, "num_res_blocks": cfg.num_res_blocks}
    settings = diffusion_settings(flags)
    schedule = NoiseSchedule.from_name(settings.noise_schedule, settings.diffusion_steps)
    abar = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    T = settings.diffusion_steps
    # The network sees t * 1000 / T when the model is flagged rescale_timesteps, as in OpenAI's code.
    time_scale = 1000.0 / T if settings.rescale_timesteps else 1.0

    gen = torch.Generator().manual_seed(seed)
    model = build_openai_unet(flags)
    seeded_init_(model, gen)
    model.train()
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    x0_all = 2 * x_train - 1
    n = x0_all.shape[0]
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = x0_all[idx]
        t = torch.randint(0, T, (cfg.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(model(xt, t.float() * time_scale), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Warm-up so that the EMA is not dominated by the random initial weights in a short run.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        recent.append(loss.item())
        recent = recent[-100:]
        if step % log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - start
            print(f"denoiser step {step}/{cfg.steps} loss(avg100) {sum(recent) / len(recent):.4f} "
                  f"{elapsed:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    model.eval()

    t_eval = [50, 100, 250, 500]
    # Same seed for both, so that the two are scored on identical noise.
    eval_seed = seed + 100
    held_out_raw = _eps_mse(model, x_test, abar, t_eval, time_scale, torch.Generator().manual_seed(eval_seed))
    held_out_ema = _eps_mse(ema, x_test, abar, t_eval, time_scale, torch.Generator().manual_seed(eval_seed))
    summary: dict[str, object] = {
        "flags": flags,
        "train_seconds": seconds,
        "final_loss_avg100": sum(recent) / len(recent),
        "held_out_eps_mse_ema": held_out_ema,
        "held_out_eps_mse_raw": held_out_raw,
        "parameters": _count(ema),
    }
    return ema, summary


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    cfg: ClassifierTrainConfig,
    seed: int,
) -> tuple[DigitsCNN, dict[str, object]]:
    """Plain cross-entropy training with Adam; returns the model and a summary."""
    gen = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    seeded_init_(model, gen)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = x_train.shape[0]
    start = time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb = x_train[idx]
            if cfg.noise_std > 0:
                xb = xb + cfg.noise_std * torch.randn(xb.shape, generator=gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % 10 == 0 or epoch == cfg.epochs:
            model.eval()
            accuracy = _accuracy(model, x_test, y_test)
            print(f"classifier epoch {epoch}/{cfg.epochs} held-out acc {accuracy:.4f}", flush=True)
            model.train()
    seconds = time.perf_counter() - start
    model.eval()

    noise_gen = torch.Generator().manual_seed(seed + 100)
    noisy_acc = {
        sigma: _accuracy(model, x_test + sigma * torch.randn(x_test.shape, generator=noise_gen), y_test)
        for sigma in (0.25, 0.5)
    }
    summary: dict[str, object] = {
        "train_seconds": seconds,
        "train_accuracy": _accuracy(model, x_train, y_train),
        "held_out_accuracy": _accuracy(model, x_test, y_test),
        "held_out_noisy_accuracy": noisy_acc,
        "parameters": _count(model),
    }
    return model, summary


def one_shot_check(
    denoiser: nn.Module,
    classifier: nn.Module,
    x01: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    sigmas: tuple[float, ...] = (0.25, 0.5),
) -> dict[float, tuple[int, float, float]]:
    """Per sigma: (t*, accuracy on noisy inputs, accuracy after one-shot denoising), one noise draw.

    One-shot denoising as in Carlini et al.: x' = 2(x + delta) - 1, t* the step whose
    sqrt((1 - abar) / abar) is nearest 2 sigma, x_t = sqrt(abar) x', x0 = (x_t - sqrt(1 - abar) eps)
    / sqrt(abar) clipped to [-1, 1], then back to [0, 1] for the classifier.
    """
    abar64 = torch.tensor(NoiseSchedule.from_name("linear", 1000).alphas_cumprod, dtype=torch.float64)
    ratio = ((1 - abar64) / abar64).sqrt()
    results: dict[float, tuple[int, float, float]] = {}
    with torch.no_grad():
        for sigma in sigmas:
            t = int((ratio - 2 * sigma).abs().argmin())
            a = abar64[t].float()
            delta = sigma * torch.randn(x01.shape, generator=generator)
            x_t = a.sqrt() * (2 * (x01 + delta) - 1)
            eps = denoiser(x_t, torch.full((x01.shape[0],), float(t)))
            x0 = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            noisy_acc = _accuracy(classifier, x01 + delta, y)
            results[sigma] = (t, noisy_acc, _accuracy(classifier, (x0 + 1) / 2, y))
    return results


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def _model_card(
    command: str,
    den_cfg: DenoiserTrainConfig,
    cls_cfg: ClassifierTrainConfig,
    seed: int,
    threads: int,
    den: dict[str, object],
    cls: dict[str, object],
    sizes: dict[str, int],
    n_test: int,
    one_shot: dict[float, tuple[int, float, float]],
) -> str:
    held_ema = den["held_out_eps_mse_ema"]
    held_raw = den["held_out_eps_mse_raw"]
    assert isinstance(held_ema, dict) and isinstance(held_raw, dict)
    noisy = cls["held_out_noisy_accuracy"]
    assert isinstance(noisy, dict)
    lines = [
        "# Digits demo models",
        "",
        "Small models for the bundled offline demo, trained from scratch on scikit-learn's 8x8 digits",
        "(which ship with scikit-learn: nothing is downloaded). Not for any real use.",
        "",
        "## How they were made",
        "",
        f"- Command (from the repository root): `{command}`",
        f"- Seed {seed} for every draw (explicit torch.Generator objects), {threads} CPU thread(s), "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        f"- Data: `sklearn.datasets.load_digits()`, pixel values / 16 -> [0, 1], shape (N, 1, 8, 8). "
        f"Fixed split: `torch.randperm(1797, generator=torch.Generator().manual_seed({SPLIT_SEED}))`, "
        f"first {NUM_TRAIN} train, the remaining {n_test} are held out "
        "(`workers.digits.digits_split_indices`, `load_digits_data`). Neither model saw a held-out image.",
        "",
        "## Denoiser (`denoiser.safetensors`, flags in `denoiser_flags.json`)",
        "",
        "- OpenAI improved/guided-diffusion UNet (`workers.unet.build_openai_unet`), 1 channel, "
        f"32 base channels, channel_mult 1,2, {den_cfg.num_res_blocks} res block(s) per level, attention "
        "at 4x4 (16 channels per head) and in the middle block, scale-shift norm, epsilon output only.",
        "- DDPM training: linear betas 1e-4..0.02, T = 1000, t uniform, epsilon MSE, images in [-1, 1], "
        "network fed t (rescale_timesteps with T = 1000 is the identity).",
        f"- AdamW lr {den_cfg.lr:g}, weight decay {den_cfg.weight_decay:g}, batch {den_cfg.batch_size} "
        f"(sampled with replacement), {den_cfg.steps} steps; saved weights are the EMA "
        f"(decay {den_cfg.ema_decay:g} with warm-up).",
        f"- Parameters: {den['parameters']:,}. Training time: {den['train_seconds']:.0f} s.",
        f"- Final training loss (mean of the last 100 steps): {den['final_loss_avg100']:.4f}.",
        "- Held-out epsilon MSE at fixed t (EMA / raw weights): "
        + ", ".join(f"t={t}: {held_ema[t]:.4f} / {held_raw[t]:.4f}" for t in held_ema)
        + ".",
        "",
        "## Classifier (`classifier.safetensors`)",
        "",
        "- `workers.digits.DigitsCNN`: conv3x3(32) - ReLU - conv3x3(64) - ReLU - maxpool2 - "
        "linear(1024->128) - ReLU - linear(128->10); input in [0, 1].",
        "- Trained on clean digits"
        + (f" with Gaussian noise augmentation std {cls_cfg.noise_std:g}" if cls_cfg.noise_std > 0 else
           " (no noise augmentation, on purpose: Cohen's baseline in the demo is this clean classifier "
           "on noisy inputs)")
        + f"; Adam lr {cls_cfg.lr:g}, batch {cls_cfg.batch_size}, {cls_cfg.epochs} epochs.",
        f"- Parameters: {cls['parameters']:,}. Training time: {cls['train_seconds']:.0f} s.",
        f"- Accuracy: train {cls['train_accuracy']:.4f}, clean held-out {cls['held_out_accuracy']:.4f} "
        f"({n_test} images); held-out with one Gaussian noise draw (no denoising): "
        + ", ".join(f"sigma {s}: {a:.4f}" for s, a in noisy.items())
        + ".",
        "",
        "## Does the denoiser help? (one noise draw per held-out image)",
        "",
        "Clean classifier on noisy held-out digits vs on the same digits after one-shot denoising "
        "(Carlini et al.: one network call at the t* whose noise level matches 2 sigma):",
        "",
        "| sigma | t* | noisy accuracy | one-shot denoised accuracy |",
        "|---|---|---|---|",
        *(f"| {s} | {t} | {a_noisy:.4f} | {a_den:.4f} |" for s, (t, a_noisy, a_den) in one_shot.items()),
        "",
        "## Files",
        "",
        "| file | bytes |",
        "|---|---|",
        *(f"| {name} | {size:,} |" for name, size in sizes.items()),
        f"| total | {sum(sizes.values()):,} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ASSET_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    d, c = DenoiserTrainConfig(), ClassifierTrainConfig()
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay)
    parser.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks)
    parser.add_argument("--classifier-epochs", type=int, default=c.epochs)
    parser.add_argument("--classifier-noise-std", type=float, default=c.noise_std,
                        help="Gaussian augmentation std for the classifier; keep 0 for the demo")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    den_cfg = DenoiserTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  ema_decay=args.ema_decay, num_res_blocks=args.num_res_blocks)
    cls_cfg = ClassifierTrainConfig(epochs=args.classifier_epochs, noise_std=args.classifier_noise_std)
    print(f"denoiser config {asdict(den_cfg)}\nclassifier config {asdict(cls_cfg)}", flush=True)

    x_train, y_train, x_test, y_test = load_digits_data()
    classifier, cls_summary = train_classifier(x_train, y_train, x_test, y_test, cls_cfg, seed=args.seed + 1)
    denoiser, den_summary = train_denoiser(x_train, x_test, den_cfg, seed=args.seed)

    check_gen = torch.Generator().manual_seed(args.seed + 200)
    one_shot = one_shot_check(denoiser, classifier, x_test, y_test, check_gen)

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    save_file(_state_for_saving(denoiser), str(out / DENOISER_FILE))
    (out / DENOISER_FLAGS_FILE).write_text(json.dumps(den_summary["flags"], indent=1) + "\n")
    save_file(_state_for_saving(classifier), str(out / CLASSIFIER_FILE))
    written = (DENOISER_FILE, DENOISER_FLAGS_FILE, CLASSIFIER_FILE)
    sizes = {name: (out / name).stat().st_size for name in written}

    argv_used = sys.argv[1:] if argv is None else argv
    command = " ".join(["python scripts/train_digits.py", *argv_used])
    card = _model_card(command, den_cfg, cls_cfg, args.seed, args.threads, den_summary, cls_summary, sizes,
                       n_test=int(x_test.shape[0]), one_shot=one_shot)
    (out / "MODEL_CARD.md").write_text(card)
    print(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
