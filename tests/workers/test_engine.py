"""The engine's promises: counts depend on seeds, device type, precision and batch size only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures.models import ToyClassifier, tiny_denoiser
from workers.classifier import Classifier
from workers.engine import CountJob, Engine, NonFiniteError
from workers.purify import PurifySpec
from workers.seeds import draw_seeds


@pytest.fixture(scope="module")
def digits():
    from workers.data import load_dataset
    from workers.models import load_classifier, load_denoiser

    return load_dataset("digits"), load_classifier("digits"), load_denoiser("digits")


@pytest.mark.parametrize("votes, vote_counts", [(4, [1, 4]), (40, [1, 5, 10, 20, 40])])
def test_packing_several_units_gives_the_counts_of_one_unit_at_a_time(digits, votes, vote_counts):
    """Counts and costs (votes computed, forwards) of a unit are the same alone or packed with
    others: which votes early majority computes depends on a draw's own votes only."""
    data, classifier, denoiser = digits
    engine = Engine(classifier, denoiser, batch_size=64, precision="fp32")
    spec = PurifySpec("densepure", 0.5, steps=2, votes=votes)
    jobs = [CountJob(data.get(i)[0], spec, draw_seeds(0, i, 0.5, "estimate", 10 * i, 23 + i), vote_counts) for i in range(4)]
    jobs.append(CountJob(data.get(9)[0], PurifySpec("dds", 0.5), draw_seeds(0, 9, 0.5, "estimate", 0, 30), [1]))
    together = engine.count_many(jobs)
    for job, packed in zip(jobs, together):
        alone = engine.count_many([job])[0]
        np.testing.assert_array_equal(alone.counts, packed.counts)
        assert (alone.unet_forwards, alone.votes_computed) == (packed.unet_forwards, packed.votes_computed)


def test_splitting_draws_into_units_does_not_change_their_counts(digits):
    data, classifier, denoiser = digits
    engine = Engine(classifier, denoiser, batch_size=32, precision="fp32")
    spec = PurifySpec("densepure", 0.25, steps=2, votes=3)
    image = data.get(5)[0]
    whole = engine.count(image, spec, draw_seeds(1, 5, 0.25, "estimate", 0, 90), [1, 3]).counts
    parts = sum(engine.count(image, spec, draw_seeds(1, 5, 0.25, "estimate", lo, 30), [1, 3]).counts for lo in (0, 30, 60))
    np.testing.assert_array_equal(whole, parts)


@pytest.mark.parametrize("votes,vote_counts", [(4, [1, 4]), (40, [1, 5, 10, 20, 40])])
def test_early_majority_counts_equal_every_vote_computed(digits, votes, vote_counts):
    data, classifier, denoiser = digits
    spec = PurifySpec("densepure", 0.25, steps=2, votes=votes)
    seeds = draw_seeds(0, 2, 0.25, "estimate", 0, 60)
    early = Engine(classifier, denoiser, batch_size=128, precision="fp32").count(data.get(2)[0], spec, seeds, vote_counts)
    full = Engine(classifier, denoiser, batch_size=128, precision="fp32", early_majority=False).count(data.get(2)[0], spec, seeds, vote_counts)
    np.testing.assert_array_equal(early.counts, full.counts)
    assert full.votes_skipped == 0 and full.votes_computed == 60 * votes
    assert early.votes_computed + early.votes_skipped == 60 * votes
    assert early.unet_forwards == 60 + early.votes_computed * (2 - 1) < full.unet_forwards
    if votes == 40:
        assert early.votes_computed <= 0.7 * full.votes_computed  # most draws' votes agree here


def test_non_finite_purifications_are_refused_not_counted():
    class Nan(torch.nn.Module):
        num_classes = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 3), float("nan"))

    engine = Engine(Classifier(Nan(), 3), tiny_denoiser(learn_sigma=True), batch_size=8, precision="fp32")
    with pytest.raises(NonFiniteError, match="not finite"):
        engine.count(torch.rand(1, 8, 8), PurifySpec("dds", 0.5), draw_seeds(0, 0, 0.5, "estimate", 0, 4))


def test_the_global_rng_is_untouched_and_results_repeat():
    den = tiny_denoiser(learn_sigma=True)
    engine = Engine(ToyClassifier(), den, batch_size=16, precision="fp32")
    spec = PurifySpec("densepure", 0.5, steps=2, votes=3)
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(4))
    seeds = draw_seeds(0, 0, 0.5, "estimate", 0, 20)
    state = torch.random.get_rng_state()
    a, b = engine.purify(image, spec, seeds), engine.purify(image, spec, seeds)
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(a, b)
