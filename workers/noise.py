"""Seeds to noise: one generator per stream, standard normals drawn in a fixed order.

Each stream of ``workers/seeds.py`` becomes its own generator, so a stream's numbers do not
depend on which other streams are drawn, in what batch, on which worker:

* CPU: numpy's Philox counter-based generator keyed with the full 64-bit seed. (PyTorch's CPU
  generator, a Mersenne Twister, keeps only the low 32 bits of a seed, so streams whose seeds
  differ only above bit 31 would repeat each other's noise.)
* CUDA: PyTorch's CUDA generator (Philox) seeded with the full 64-bit seed.

The two are different generators, so a CPU run and a CUDA run of the same seed see different
(equally valid) noise; every count is reproducible on the same device type. A stream hands out
one standard-normal tensor per call, in the order the sampler asks (the smoothing noise of a
draw; then one tensor per noise-adding reverse step of a vote). No global RNG state is touched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["Streams"]


class Streams:
    """Independent standard-normal streams, one per seed, on ``device``."""

    def __init__(self, seeds: Sequence[int] | np.ndarray, device: torch.device | str):
        self.device = torch.device(device)
        seeds = np.asarray(seeds, dtype=np.uint64).ravel()
        if self.device.type == "cuda":
            self._gens: list = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        else:
            self._gens = [np.random.Generator(np.random.Philox(key=int(s))) for s in seeds]

    def __len__(self) -> int:
        return len(self._gens)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(self), *shape): the next standard-normal tensor of every stream (float32 draws)."""
        if self.device.type == "cuda":
            out = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self._gens])
        else:
            out = torch.from_numpy(np.stack([g.standard_normal(shape, dtype=np.float32) for g in self._gens]))
        return out.to(dtype)
