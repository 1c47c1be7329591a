"""The benchmark's reference loop (benchmarks/reference.py) computes the engine's function.

Speed comparisons are only fair if both sides do the same work: here the reference loop, fed the
same noise, must purify every vote exactly as the engine does (which shares the first step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.reference import ReferenceLoop
from tests.fixtures.models import ToyClassifier, replay_noise, tiny_denoiser
from workers.engine import Engine
from workers.classifier import Classifier
from workers.purify import Purifier, PurifySpec


class _Replay(ReferenceLoop):
    """Takes its 'random' numbers from a queue instead of a generator."""

    queue: list[torch.Tensor]

    def randn(self, shape, gen):  # noqa: ANN001
        out = self.queue.pop(0)
        assert tuple(out.shape) == tuple(shape)
        return out


@pytest.mark.parametrize("learn_sigma,steps", [(True, 2), (False, 3), (True, 1)])
def test_reference_votes_equal_engine_purification(learn_sigma: bool, steps: int) -> None:
    den = tiny_denoiser(learn_sigma=learn_sigma)
    sigma, votes, seeds = 0.5, 3, [5, 6]
    x01 = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    spec = PurifySpec("densepure", sigma, steps=steps, votes=votes)
    with torch.inference_mode():
        engine_out = Purifier(spec, den)(x01.expand(2, 1, 8, 8), seeds)
    delta, step_noise = replay_noise(seeds, (1, 8, 8), votes=votes, noisy_steps=steps - 1)
    ref = _Replay(Classifier(ToyClassifier(), 3), den, "cpu", sigma, steps, votes, batch=2)
    for k in range(votes):
        # The last step's noise is drawn by the reference but masked out: any values do.
        ref.queue = [n[:, k] for n in step_noise] + [torch.full((2, 1, 8, 8), 1e3)]
        with torch.no_grad():
            x_re = ref.image_editing_sample((x01 + sigma * delta - 0.5) * 2, torch.Generator())
        torch.testing.assert_close((x_re + 1) / 2, engine_out[:, k], rtol=1e-5, atol=1e-5)


def test_reference_counts_and_merge() -> None:
    den = tiny_denoiser(learn_sigma=True)
    ref = ReferenceLoop(Classifier(ToyClassifier(), 3), den, "cpu", 0.25, steps=2, votes=3, batch=4)
    counts = ref.count(torch.rand(1, 8, 8), num=10)
    assert counts.shape == (3,) and counts.sum() == 10
    # Ties go to the label seen first in vote order, as in merge_results.py.
    assert ref.merge([np.array([2, 0]), np.array([1, 1]), np.array([0, 2])]).tolist() == [1, 0, 1]
    assert ref.forwards_per_draw == 6
    # Every vote computed: 1 + K(b - 1) forwards per draw against the reference's K b.
    eng = Engine(Classifier(ToyClassifier(), 3), den, early_majority=False)
    assert eng.count(torch.rand(1, 8, 8), PurifySpec("densepure", 0.25, 2, 3), list(range(10))).unet_forwards == 10 * 4
