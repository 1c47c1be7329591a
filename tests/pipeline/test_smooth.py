"""``pipeline.smooth.Smooth`` against Cohen et al.'s own ``Smooth``, and its input checks.

``CohenSmooth`` below is a transcription of ``code/core.py`` of locuslab/smoothing (Cohen et al.
2019) kept in the test, not in the package: it draws from torch's global random state, so the
two implementations can only agree in distribution. They are compared over many seeds on a
classifier whose top-class probability is known in closed form (class 0 iff the first pixel of
its input is below a threshold: p_A = Phi((threshold - x0) / sigma)), and both are compared with
the exact law of CERTIFY's output (nA ~ Binomial(n, p_A)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, ks_2samp, norm

from pipeline.smooth import Smooth
from workers.errors import UserError


# --------------------------------------------------------------------------------------------
# Cohen's Smooth, transcribed (CPU instead of 'cuda'; scipy's beta quantile for statsmodels'
# proportion_confint(NA, N, alpha=2*alpha, method="beta")[0], which is the same number; scipy's
# binomtest for the removed binom_test)


class CohenSmooth:
    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float):
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        self.base_classifier.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        cAHat = counts_selection.argmax().item()
        counts_estimation = self._sample_noise(x, n, batch_size)
        nA = counts_estimation[cAHat].item()
        pABar = self._lower_confidence_bound(nA, n, alpha)
        if pABar < 0.5:
            return CohenSmooth.ABSTAIN, 0.0
        return cAHat, self.sigma * norm.ppf(pABar)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        self.base_classifier.eval()
        counts = self._sample_noise(x, n, batch_size)
        top2 = counts.argsort()[::-1][:2]
        count1, count2 = counts[top2[0]], counts[top2[1]]
        if binomtest(int(count1), int(count1 + count2), p=0.5).pvalue > alpha:
            return CohenSmooth.ABSTAIN
        return int(top2[0])

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(math.ceil(num / batch_size)):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(batch) * self.sigma
                predictions = self.base_classifier(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    def _count_arr(self, arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts

    def _lower_confidence_bound(self, NA: int, N: int, alpha: float) -> float:
        return 0.0 if NA == 0 else float(beta.ppf(alpha, NA, N - NA + 1))


# --------------------------------------------------------------------------------------------


class FirstPixelBelow(torch.nn.Module):
    """Class 0 iff the first pixel is below ``threshold``, else class 1 (class 2 never)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.flatten(1)[:, :1] - self.threshold
        return torch.cat([-d, d, torch.full_like(d, -1e9)], dim=1)


SIGMA, X0 = 0.25, 0.5
N0, N, ALPHA, BATCH = 20, 200, 0.001, 64
TRIALS = 400


def _image() -> torch.Tensor:
    x = torch.full((1, 2, 2), 0.3)
    x[0, 0, 0] = X0
    return x


def _threshold(p_a: float) -> float:
    return X0 + SIGMA * float(norm.ppf(p_a))


def _exact_radius_law(p_a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(radius, certifies, probability) for each nA = 0..n, nA ~ Bin(n, p_A), class 0 selected."""
    n_a = np.arange(N + 1)
    lower = np.where(n_a == 0, 0.0, beta.ppf(ALPHA, np.maximum(n_a, 1), N - n_a + 1))
    lower[-1] = ALPHA ** (1 / N)
    certifies = lower >= 0.5
    radius = np.where(certifies, SIGMA * norm.ppf(np.clip(lower, 1e-300, 1)), 0.0)
    return radius, certifies, binom.pmf(n_a, N, p_a)


@pytest.mark.parametrize("p_a", [0.9, 0.62])
def test_certify_has_cohens_distribution(p_a: float) -> None:
    """Same predictions and radius law as Cohen's code, and as the exact law, over many seeds.

    p_A = 0.9 always certifies class 0 with a spread of radii; p_A = 0.62 abstains about half
    of the time. A wrong noise scale, a reused sample or a wrong bound moves the radii far
    outside what these tests accept (e.g. noise 2 sigma gives p_A 0.77 instead of 0.9).
    """
    clf = FirstPixelBelow(_threshold(p_a))
    x = _image()
    ours = [Smooth(clf, 3, SIGMA, seed=s).certify(x, N0, N, ALPHA, BATCH) for s in range(TRIALS)]
    torch.manual_seed(12345)
    cohen = CohenSmooth(clf, 3, SIGMA)
    theirs = [cohen.certify(x, N0, N, ALPHA, BATCH) for _ in range(TRIALS)]

    ours_pred = np.array([p for p, _ in ours])
    theirs_pred = np.array([p for p, _ in theirs])
    ours_r = np.array([r for _, r in ours])
    theirs_r = np.array([r for _, r in theirs])
    assert set(ours_pred) <= {0, -1} and set(theirs_pred) <= {0, -1}
    assert np.all(ours_r[ours_pred == -1] == 0.0)

    radius, certifies, prob = _exact_radius_law(p_a)
    p_certify = float(prob[certifies].sum())
    for preds in (ours_pred, theirs_pred):
        # Abstention rate: two-sided binomial test against the exact rate.
        assert binomtest(int((preds == 0).sum()), TRIALS, p_certify).pvalue > 1e-3
    # Radii: ours vs Cohen's (two-sample KS), and ours vs the exact law (mean within 4 SE).
    assert ks_2samp(ours_r, theirs_r).pvalue > 1e-3
    mean = float((radius * prob).sum())
    sd = math.sqrt(float(((radius - mean) ** 2 * prob).sum()))
    assert abs(ours_r.mean() - mean) < 4 * sd / math.sqrt(TRIALS) + 1e-12
    # Quantiles of the certified radii agree with Cohen's to a small fraction of sigma.
    if (ours_pred == 0).sum() > 50 and (theirs_pred == 0).sum() > 50:
        q = [0.1, 0.5, 0.9]
        np.testing.assert_allclose(np.quantile(ours_r[ours_pred == 0], q), np.quantile(theirs_r[theirs_pred == 0], q),
                                   atol=0.02)


def test_predict_has_cohens_distribution() -> None:
    """PREDICT at p_A = 0.55 with n = 200 abstains often; the abstention rates must agree."""
    clf = FirstPixelBelow(_threshold(0.55))
    x = _image()
    ours = np.array([Smooth(clf, 3, SIGMA, seed=s).predict(x, N, 0.05, BATCH) for s in range(TRIALS)])
    torch.manual_seed(54321)
    cohen = CohenSmooth(clf, 3, SIGMA)
    theirs = np.array([cohen.predict(x, N, 0.05, BATCH) for _ in range(TRIALS)])
    assert set(ours) <= {0, 1, -1} and set(theirs) <= {0, 1, -1}
    # Exact: nA ~ Bin(200, 0.55) (class 1 gets the rest); returns 0 when the test rejects.
    n_a = np.arange(N + 1)
    rejects = np.array([binomtest(int(max(k, N - k)), N, 0.5).pvalue <= 0.05 and k > N - k for k in n_a])
    p_zero = float(binom.pmf(n_a, N, 0.55)[rejects].sum())
    for preds in (ours, theirs):
        assert binomtest(int((preds == 0).sum()), TRIALS, p_zero).pvalue > 1e-3


def test_the_same_call_gives_the_same_answer_whatever_the_batch_size() -> None:
    clf = FirstPixelBelow(_threshold(0.8))
    smooth = Smooth(clf, 3, SIGMA, seed=3)
    x = _image()
    first = smooth.certificate(x, N0, N, ALPHA, 64)
    assert smooth.certificate(x, N0, N, ALPHA, 64) == first
    assert smooth.certificate(x, N0, N, ALPHA, 7)[2] == first[2]
    # Other image ids draw other noise (one could tie by chance: three cannot all tie).
    assert any(smooth.certificate(x, N0, N, ALPHA, 64, image_id=i)[2] != first[2] for i in (1, 2, 3))


# --------------------------------------------------------------------------------------------
# denoisers in every accepted form: the same answers as the source string


def test_openai_unet_with_flags_equals_the_source_string() -> None:
    from workers.data import load_dataset
    from workers.digits import load_digits_denoiser

    x = torch.as_tensor(load_dataset("digits").get(3)[0])
    unet, flags = load_digits_denoiser()
    kw = dict(method="densepure", votes=2, steps=2, seed=1)
    want = Smooth("digits", 10, 0.25, denoiser="digits", **kw).certificate(x, 4, 12, 0.1, 32)
    assert want[2].count > 0  # the digits models mostly agree with the label: a real count to compare
    assert Smooth("digits", 10, 0.25, denoiser=unet, model_flags=flags, **kw).certificate(x, 4, 12, 0.1, 32) == want
    with pytest.raises(UserError, match="model_flags"):
        Smooth("digits", 10, 0.5, denoiser=unet, **kw)


def test_diffusers_unet_with_scheduler_equals_the_saved_folder(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small")
    unet.save_pretrained(tmp_path / "unet")
    sched.save_pretrained(tmp_path / "scheduler")
    clf = FirstPixelBelow(0.6)
    x = torch.full((1, 4, 4), 0.4)
    kw = dict(method="dds", seed=2)
    want = Smooth(clf, 3, 0.25, denoiser=f"diffusers:{tmp_path}", **kw).certificate(x, 5, 20, 0.01, 16)
    assert Smooth(clf, 3, 0.25, denoiser=unet, scheduler=sched, **kw).certificate(x, 5, 20, 0.01, 16) == want
    with pytest.raises(UserError, match="scheduler"):
        Smooth(clf, 3, 0.25, denoiser=unet, **kw)


# --------------------------------------------------------------------------------------------
# bad input: one line, before any network runs


def _one_line(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg and "--" not in msg, msg  # no CLI wording in a library message
    for needle in needles:
        assert needle in msg, msg


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        (dict(method="magic"), ["magic", "cohen"]),
        (dict(method="densepure"), ["needs a denoiser"]),
        (dict(votes=0), ["votes"]),
        (dict(precision="fp8"), ["fp8"]),
        (dict(device="tpu"), ["tpu"]),
        (dict(denoiser=object(), method="dds"), ["denoiser must be"]),
    ],
)
def test_bad_arguments(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(UserError) as e:
        Smooth(FirstPixelBelow(0.5), 3, SIGMA, **kwargs)
    _one_line(e, *needles)


def test_bad_calls() -> None:
    smooth = Smooth(FirstPixelBelow(0.5), 3, SIGMA)
    x = _image()
    for call, needles in [
        (lambda: smooth.certify(x[None], N0, N, ALPHA, BATCH), ["(C, H, W)"]),
        (lambda: smooth.certify(x * 3, N0, N, ALPHA, BATCH), ["[0, 1]"]),
        (lambda: smooth.certify(x, 0, N, ALPHA, BATCH), ["n0"]),
        (lambda: smooth.certify(x, N0, N, 1.5, BATCH), ["alpha"]),
        (lambda: smooth.certify(x, N0, N, ALPHA, 0), ["batch_size"]),
        (lambda: smooth.predict(x, N, 0.0, BATCH), ["alpha"]),
    ]:
        with pytest.raises(UserError) as e:
            call()
        _one_line(e, *needles)
    with pytest.raises(UserError) as e:
        Smooth(FirstPixelBelow(0.5), 5, SIGMA).certify(x, N0, N, ALPHA, BATCH)
    _one_line(e, "(1, 3)", "(1, 5)")
    with pytest.raises(UserError) as e:
        Smooth("digits", 7, SIGMA)
    _one_line(e, "10 classes", "num_classes=10")


def test_a_grey_image_with_an_rgb_denoiser_names_the_channels(tmp_path: Path) -> None:
    from workers.unet import build_openai_unet

    flags = {"image_size": 8, "in_channels": 3, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
             "attention_resolutions": "", "num_head_channels": 16, "learn_sigma": False, "diffusion_steps": 1000,
             "noise_schedule": "linear"}
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(flags))
    smooth = Smooth(FirstPixelBelow(0.5), 3, SIGMA, denoiser=build_openai_unet(flags), model_flags=str(path), method="dds")
    with pytest.raises(UserError) as e:
        smooth.certify(torch.rand(1, 8, 8), N0, N, ALPHA, BATCH)
    _one_line(e, "1 channel but the denoiser takes 3")
    with pytest.raises(UserError) as e:
        smooth.certify(torch.rand(3, 4, 4), N0, N, ALPHA, BATCH)
    _one_line(e, "4x4", "8x8")
