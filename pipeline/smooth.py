"""``Smooth``: Cohen et al.'s smoothed classifier as one Python object, for notebooks.

The same interface as Cohen's ``Smooth`` (locuslab/smoothing, ``code/core.py``):
``Smooth(base_classifier, num_classes, sigma)``, ``certify(x, n0, n, alpha, batch_size) ->
(prediction, radius)``, ``predict(x, n, alpha, batch_size) -> prediction`` and ``ABSTAIN = -1``;
plus keyword-only options that choose a purifier (``method="dds"`` or ``"densepure"`` with a
``denoiser``, ``votes`` K and ``steps`` b) and fix the randomness (``seed``).

It runs exactly the code a ``densepure certify`` run runs for one image: draw seeds from
``workers.seeds.draw_seeds`` (phases "select" and "estimate"), class counts from
``workers.engine.Engine.count``, and the decision from ``pipeline.stats``. So
``Smooth(f, C, sigma, method=m, votes=K, steps=b, seed=s).certify(x, n0, n, alpha, B,
image_id=i)`` returns the prediction and radius of the row (image i, sigma, m, K, b) of a run
with ``--seed s --n0 n0 --n n --alpha alpha --batch-size B --precision fp32`` (the default
precision here), whatever its ``--chunk`` and whatever other K it reports (each vote has its own
random stream, and every network call has exactly B rows, so neither changes a single draw).

Unlike Cohen's code, which draws from torch's global random state, every draw here has its own
seed: the same call returns the same result every time (bit for bit at the same batch size;
another batch size may change floating-point results in the last bit). For independent
repetitions, change ``seed`` (or ``image_id``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import stats
from workers.classifier import Classifier
from workers.contract import METHODS, PRECISIONS, copies, needs_denoiser, table_steps
from workers.denoiser import Denoiser
from workers.engine import Engine
from workers.errors import UserError
from workers.purify import PurifySpec
from workers.seeds import draw_seeds

__all__ = ["Smooth"]

ClassifierLike = nn.Module | str
DenoiserLike = Denoiser | nn.Module | str | None


def _whole(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise UserError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


class Smooth:
    """A smoothed classifier g(x) = argmax_c P[f(purify(x + delta)) = c], delta ~ N(0, sigma^2 I).

    ``f`` is the base classifier; ``purify`` is the identity for ``method="cohen"`` (Cohen et
    al. 2019), one denoising step at the diffusion timestep matching sigma for ``"dds"``
    (Carlini et al. 2023), and for ``"densepure"`` (Xiao et al. 2023) K runs of a b-step reverse
    diffusion process, whose K labels are reduced to their majority vote (ties: the label seen
    first).

    Arguments:

    * ``classifier``: a ``torch.nn.Module`` mapping (N, C, H, W) images in [0, 1] to
      (N, num_classes) logits (its own normalisation inside; wrapped in
      ``workers.classifier.Classifier``), a ``Classifier``, or a source string as the pipeline
      takes it (``"hf:DIR"``, ``"hf:ORG/NAME"``, ``"torchscript:FILE"``, ``"digits"``).
    * ``num_classes``: the classifier's number of outputs.
    * ``sigma``: the smoothing noise level, in the [0, 1] scale of the image.
    * ``denoiser`` (DDS and DensePure only): a ``workers.denoiser.Denoiser``; an OpenAI
      ``workers.unet.UNetModel`` with ``model_flags`` (a dict or JSON file of the flags it was
      trained with); a diffusers ``UNet2DModel`` with its ``DDPMScheduler`` as ``scheduler``; or a
      source string (``"openai:CKPT"`` with ``model_flags``, ``"diffusers:DIR"``,
      ``"diffusers:ORG/NAME"``, ``"digits"``).
    * ``votes`` K and ``steps`` b: DensePure's votes per draw and reverse steps.
    * ``device`` ("cpu", "cuda" or "auto"), ``precision`` ("fp32", "bf16", "fp16" or "auto"),
      ``seed``: the run seed every draw's seed derives from.

    Bad arguments raise ``workers.errors.UserError`` with a one-line message, before any
    network runs.
    """

    ABSTAIN: int = stats.ABSTAIN
    """The prediction returned on abstention (with radius 0.0), as in Cohen's code."""

    def __init__(
        self,
        classifier: ClassifierLike,
        num_classes: int,
        sigma: float,
        *,
        denoiser: DenoiserLike = None,
        model_flags: str | dict | None = None,
        scheduler: Any = None,
        method: str = "cohen",
        votes: int = 1,
        steps: int = 1,
        device: str = "cpu",
        precision: str = "fp32",
        seed: int = 0,
    ):
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        stats.validate_sigma(sigma)
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.num_classes = _whole(num_classes, "num_classes", 2)
        self.sigma = float(sigma)
        self.method = method
        self.votes = _whole(votes, "votes")
        self.steps = _whole(steps, "steps")
        self.seed = _whole(seed, "seed", 0)
        self.precision = precision
        self.device = _resolve_device(device)
        self.base_classifier = self._classifier(classifier)
        self.denoiser: Denoiser | None = None
        if needs_denoiser(method):
            if denoiser is None:
                raise UserError(f"method {method!r} purifies its noisy copies and needs a denoiser: pass denoiser=...")
            self.denoiser = _denoiser(denoiser, model_flags, scheduler)
        # The same PurifySpec a run's work unit builds (workers.worker.run_unit): Cohen and DDS
        # have one copy and one (or no) step, DensePure K copies and b steps.
        self.spec = PurifySpec(method, self.sigma, max(table_steps(method, self.steps), 1), copies(method, self.votes))
        self._vote_counts = [self.spec.copies]
        self._engines: dict[int, Engine] = {}
        self._checked_shapes: set[tuple[int, ...]] = set()

    # ---------------------------------------------------------------------------------------
    # Cohen's interface

    def certify(self, x: torch.Tensor | np.ndarray, n0: int, n: int, alpha: float, batch_size: int,
                *, image_id: int = 0) -> tuple[int, float]:
        """Cohen et al.'s CERTIFY: (prediction, certified L2 radius), or (ABSTAIN, 0.0).

        ``x``: one (C, H, W) image in [0, 1]. n0 selection draws pick the top class cA; n
        independent estimation draws give nA votes for cA; pA is the one-sided (1 - alpha)
        Clopper-Pearson lower bound of nA / n; abstain if pA < 1/2, else return (cA,
        sigma * Phi^-1(pA)). ``batch_size``: images per network batch (draws x K copies).
        ``image_id`` selects the draws' seeds (those of image ``image_id`` in a run).

        Guarantee (Cohen et al., Theorem 1 and Proposition 2): with probability at least
        1 - alpha over the draws, a non-abstaining answer is right: the smoothed classifier g
        returns cA at every x' with ||x' - x||_2 < radius. For DDS and DensePure the base
        classifier is f(purify(.)), randomised by the reverse process; the theorem holds for it
        too, because g's class probabilities are still Gaussian smoothings of a [0, 1]-valued
        function of the noisy input (Salman et al. 2019, Lemma 2).
        """
        return self.certificate(x, n0, n, alpha, batch_size, image_id=image_id)[:2]

    def certificate(self, x: torch.Tensor | np.ndarray, n0: int, n: int, alpha: float, batch_size: int,
                    *, image_id: int = 0) -> tuple[int, float, stats.Certificate]:
        """:meth:`certify` with the whole ``pipeline.stats.Certificate`` (nA, pA) as third item."""
        n0, n = _whole(n0, "n0"), _whole(n, "n")
        _check_alpha(alpha)
        image = self._image(x)
        counts0 = self._counts(image, "select", n0, batch_size, image_id)
        counts = self._counts(image, "estimate", n, batch_size, image_id)
        cert = stats.certify(counts0, counts, n0, n, float(alpha), self.sigma)
        return cert.prediction, cert.radius, cert

    def predict(self, x: torch.Tensor | np.ndarray, n: int, alpha: float, batch_size: int,
                *, image_id: int = 0) -> int:
        """Cohen et al.'s PREDICT: the smoothed classifier's class at ``x``, or ABSTAIN.

        n draws (the estimation draws of ``image_id``); with nA >= nB the two largest counts,
        abstain unless the two-sided binomial test of nA out of nA + nB against 1/2 has p-value
        <= alpha. Guarantee (Cohen et al., Proposition 1): the probability of returning a class
        other than g(x) is at most alpha.
        """
        n = _whole(n, "n")
        _check_alpha(alpha)
        image = self._image(x)
        return stats.predict(self._counts(image, "estimate", n, batch_size, image_id), n, float(alpha))

    # ---------------------------------------------------------------------------------------
    # internals

    def _classifier(self, classifier: ClassifierLike) -> Classifier:
        if isinstance(classifier, str):
            from workers.models import load_classifier

            loaded = load_classifier(classifier, device="cpu", num_classes=self.num_classes)
            if loaded.num_classes != self.num_classes:
                raise UserError(
                    f"classifier {classifier} has {loaded.num_classes} classes but num_classes is {self.num_classes}: "
                    f"pass num_classes={loaded.num_classes}"
                )
            return loaded
        if isinstance(classifier, Classifier):
            if classifier.num_classes != self.num_classes:
                raise UserError(
                    f"the Classifier has {classifier.num_classes} classes but num_classes is {self.num_classes}: "
                    f"pass num_classes={classifier.num_classes}"
                )
            return classifier
        if isinstance(classifier, nn.Module):
            return Classifier(classifier, self.num_classes)
        raise UserError(
            f"classifier must be a torch.nn.Module or a source string (hf:..., torchscript:..., digits), "
            f"got {type(classifier).__name__}"
        )

    def _engine(self, batch_size: int) -> Engine:
        batch_size = _whole(batch_size, "batch_size")
        if batch_size not in self._engines:
            self._engines[batch_size] = Engine(
                self.base_classifier, self.denoiser, device=self.device, batch_size=batch_size, precision=self.precision
            )
        return self._engines[batch_size]

    def _image(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``x`` as a float32 (C, H, W) tensor on the device, checked against the networks."""
        image = torch.as_tensor(x).detach()
        if image.ndim != 3:
            raise UserError(f"x must be one (C, H, W) image, got shape {tuple(image.shape)}: pass x[i], not a batch")
        image = image.to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(image).all()) or float(image.min()) < 0.0 or float(image.max()) > 1.0:
            raise UserError("x must hold finite values in [0, 1]: scale the image into [0, 1] (no normalisation)")
        shape = tuple(image.shape)
        if self.denoiser is not None:
            den = self.denoiser
            if shape[0] != den.in_channels:
                raise UserError(
                    f"x has {shape[0]} channel{'s' if shape[0] != 1 else ''} but the denoiser takes {den.in_channels}: "
                    "convert the image or use a denoiser trained on such images"
                )
            if shape[1:] != (den.image_size, den.image_size):
                raise UserError(
                    f"x is {shape[1]}x{shape[2]} but the denoiser takes {den.image_size}x{den.image_size} images: "
                    "resize the image or use the denoiser trained at this resolution"
                )
        if shape not in self._checked_shapes:
            self._check_logits(image)
            self._checked_shapes.add(shape)
        return image

    @torch.inference_mode()
    def _check_logits(self, image: torch.Tensor) -> None:
        """One forward pass: the classifier must give (1, num_classes) logits for this input."""
        clf = self.base_classifier.to(self.device).eval()
        try:
            out = clf(image.unsqueeze(0))
        except Exception as exc:  # a classifier that cannot take this input at all
            from workers.errors import first_line

            raise UserError(f"the classifier fails on a {tuple(image.shape)} input: {first_line(exc)}") from exc
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, self.num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(
                f"the classifier returns {got} for one image but Smooth needs (1, num_classes) = (1, {self.num_classes}) logits"
            )

    def _counts(self, image: torch.Tensor, phase: str, num: int, batch_size: int, image_id: int) -> np.ndarray:
        """Class counts of ``num`` draws of ``phase``: the counts the run's units of this phase sum to."""
        seeds = draw_seeds(self.seed, _whole(image_id, "image_id", 0), self.sigma, phase, 0, num)
        result = self._engine(batch_size).count(image, self.spec, seeds, self._vote_counts)
        return result.counts[0]

    def __repr__(self) -> str:
        extra = f", votes={self.votes}, steps={self.steps}" if self.method == "densepure" else ""
        return (f"Smooth(num_classes={self.num_classes}, sigma={self.sigma:g}, method={self.method!r}{extra}, "
                f"device={self.device!r}, precision={self.precision!r}, seed={self.seed})")


def _check_alpha(alpha: float) -> None:
    try:
        ok = math.isfinite(float(alpha)) and 0.0 < float(alpha) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"alpha must lie strictly between 0 and 1, got {alpha!r} (Cohen et al. use 0.001)")


def _resolve_device(device: str) -> str:
    from workers.contract import DEVICES

    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for but torch sees no GPU: use device='cpu' or 'auto'")
    return device


def _denoiser(denoiser: DenoiserLike, model_flags: str | dict | None, scheduler: Any) -> Denoiser:
    """A Denoiser from any of the forms ``Smooth`` accepts."""
    from workers import models

    if isinstance(denoiser, Denoiser):
        return denoiser
    if isinstance(denoiser, str):
        return models.load_denoiser(denoiser, model_flags, device="cpu")
    from workers.unet import UNetModel

    if isinstance(denoiser, UNetModel):
        if model_flags is None:
            raise UserError("an OpenAI UNetModel needs model_flags=... (the flags dict or JSON file it was trained with)")
        return models.denoiser_from_openai(denoiser.eval().requires_grad_(False), model_flags)
    if type(denoiser).__module__.startswith("diffusers") and type(denoiser).__name__ == "UNet2DModel":
        if scheduler is None:
            raise UserError("a diffusers UNet2DModel needs scheduler=... (the DDPMScheduler it was trained with)")
        return models.denoiser_from_diffusers(denoiser.eval().requires_grad_(False), scheduler)
    raise UserError(
        "denoiser must be a workers.denoiser.Denoiser, an OpenAI UNetModel (with model_flags), a diffusers "
        f"UNet2DModel (with scheduler) or a source string (openai:..., diffusers:..., digits), got {type(denoiser).__name__}"
    )
