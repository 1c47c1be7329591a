"""The classifier: a network with the preprocessing it expects, taking images in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """Maps images in [0,1] at data resolution (N,C,H,W) to logits (N, num_classes).

    Owns the preprocessing the wrapped network expects, in this order: grey-to-RGB channel
    repeat, bicubic resize (to ``size`` = (H, W), or shortest edge ``size`` = int), center crop
    to ``crop``, then ``(x - mean) / std``. Each step is skipped when its setting is None.

    ``labels`` (optional) names the classes, index by index (a Hugging Face model's ``id2label``);
    it only serves displays such as ``densepure purify --classifier``.

    The resize uses ``antialias=True``: with it torch's bicubic is PIL's bicubic (cubic
    coefficient -0.5, filter widened when downsizing), which is how Hugging Face image processors
    and timm prepared the classifiers' training data. This matters when *upsizing* too
    (32 -> 224, 256 -> 512): antialias=False switches to the -0.75 kernel and moves pixels by up
    to ~0.09 on random images.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        *,
        size: tuple[int, int] | int | None = None,
        crop: tuple[int, int] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        in_channels: int | None = None,
        hf_output: bool = False,
        antialias: bool = True,
        labels: tuple[str, ...] | None = None,
    ):
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)
        self.size = size
        self.crop = crop
        self.in_channels = in_channels
        self.hf_output = hf_output
        self.antialias = antialias
        self.labels = tuple(labels) if labels is not None else None
        # Buffers follow .to(device/dtype) with the module; non-persistent: not part of any weights.
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def _target_size(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.size, int):
            # Shortest edge to `size`, aspect kept, long side truncated as transformers does.
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.size * long / short)
            return (self.size, new_long) if h <= w else (new_long, self.size)
        return tuple(self.size)  # type: ignore[arg-type]

    def preprocess(self, x01: Tensor) -> Tensor:
        """The network input for images in [0,1]."""
        x = x01
        if self.in_channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size is not None:
            target = self._target_size(x.shape[-2], x.shape[-1])
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, size=target, mode="bicubic", align_corners=False, antialias=self.antialias)
        if self.crop is not None:
            ch, cw = self.crop
            top = (x.shape[-2] - ch) // 2
            left = (x.shape[-1] - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def label_name(self, index: int) -> str:
        """``"3"``, or ``"3 (cat)"`` when the classes have names."""
        if self.labels is not None and 0 <= index < len(self.labels) and self.labels[index]:
            return f"{index} ({self.labels[index]})"
        return str(index)

    def forward(self, x01: Tensor) -> Tensor:
        x = self.preprocess(x01)
        if self.hf_output:
            return self.net(pixel_values=x).logits
        return self.net(x)
