"""``Smooth`` (one image, in this process) gives exactly the row a pipeline run gives.

The run goes through everything a user's run does (``certify_run`` on the test Ray cluster,
a TorchScript file of the classifier, the bundled digits denoiser); ``Smooth`` gets the same
classifier as an in-memory module. Same seed, method, K, b, n0, n, alpha, batch size and fp32:
the prediction, nA and the radius must be identical, not close.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.run import certify_run
from pipeline.smooth import Smooth
from tests.fixtures.runs import quiet, tiny


class NearestMean(torch.nn.Module):
    """Nearest class mean of the digits training images: logits -||x - mu_c||^2 + ||x||^2."""

    num_classes: int = 10

    def __init__(self) -> None:
        super().__init__()
        from workers.digits import load_digits_data

        x_train, y_train, _, _ = load_digits_data()
        means = torch.stack([x_train[y_train == c].flatten(1).mean(0) for c in range(10)])
        self.fc = torch.nn.Linear(64, 10)
        with torch.no_grad():
            self.fc.weight.copy_(2 * means)
            self.fc.bias.copy_(-(means**2).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[NearestMean, str]:
    net = NearestMean().eval()
    path = tmp_path_factory.mktemp("toy") / "nearest_mean.pt"
    torch.jit.script(net).save(str(path))
    return net, f"torchscript:{path}"


def test_smooth_certify_equals_the_row_of_a_one_image_run(tmp_path, ray_driver, toy):
    from workers.data import load_dataset

    net, source = toy
    k, batch = 11, 24
    config = tiny(tmp_path / "run", classifier=source, indices=[k], sigmas=[0.25, 0.5], votes=[3], steps=2,
                  n0=10, n=60, chunk=60, batch_size=batch, precision="fp32", workers=1)
    table = certify_run(config, log=quiet).table
    assert len(table) == 2 * 3  # two sigmas x (cohen, dds, densepure K=3)
    x = torch.as_tensor(load_dataset("digits").get(k)[0])
    for row in table.itertuples(index=False):
        smooth = Smooth(net, 10, row.sigma, denoiser="digits", method=row.method, votes=int(row.votes),
                        steps=config.steps, seed=config.seed, precision="fp32")
        prediction, radius, cert = smooth.certificate(x, config.n0, config.n, config.alpha, batch, image_id=k)
        assert (prediction, cert.count, radius) == (row.prediction, row.count, row.radius), row
        assert smooth.certify(x, config.n0, config.n, config.alpha, batch, image_id=k) == (row.prediction, row.radius)
    # The rows are not all trivial: something is certified, with a positive radius.
    assert (table["radius"] > 0).any()
