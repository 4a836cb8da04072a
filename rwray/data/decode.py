"""Decoding and per-sample augmentation of encoded images (JPEG bytes in a shard) on CPU: bytes -> uint8 [3, S, S].

Train: RandomResizedCrop(S) + horizontal flip + ColorJitter(j, j, j, 0) (the ImageNet-LT / Places-LT recipe);
eval: Resize(R) of the shorter side + CenterCrop(S). The crops stay uint8 (4x less to move than float32) and are
normalised on the training device.

Train may add a per-sample policy after those (AutoAugment / RandAugment, `rwray.data.policy`).

Randomness is a function of (seed, epoch, index) alone (`policy.sample_seed`): a sample gets the same crop whichever
process decodes it, in whatever batch, after any retry or restart. torchvision's transforms draw from torch's global
generator, so it is seeded per sample (~µs) in the decoding process.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from rwray.data.policy import Policy, sample_seed

Augment = Literal["none", "flip", "rrc_flip"]  # none/flip: eval crop (+ flip); rrc_flip: RandomResizedCrop + flip

def open_rgb(data: bytes):
    """Encoded bytes -> a fully decoded RGB PIL image (grey and CMYK JPEGs converted); raises on a corrupt file."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decode now: a truncated file fails here, not later inside a transform
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """What the decoding processes apply; picklable, so Ray Data actors and DataLoader workers get the same one."""

    size: int  # S: the side of the square crop the model sees
    resize: int  # R: eval resizes the shorter side to R before the centre crop (224/256 in the ImageNet recipes)
    augment: Augment = "rrc_flip"
    color_jitter: float = 0.4  # brightness, contrast, saturation strength of rrc_flip (0: off)
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range
    policy: Policy = Policy()  # train only: AutoAugment / RandAugment after the crop, flip and jitter

    def pipeline(self, train: bool):
        from torchvision.transforms import v2

        eval_crop = [v2.Resize(self.resize), v2.CenterCrop(self.size)]
        if not train:
            return v2.Compose(eval_crop)
        if self.augment == "rrc_flip":
            steps = [v2.RandomResizedCrop(self.size, scale=self.scale), v2.RandomHorizontalFlip()]
            if self.color_jitter > 0:
                j = self.color_jitter
                steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0))
        else:
            steps = eval_crop + ([v2.RandomHorizontalFlip()] if self.augment == "flip" else [])
        policy = self.policy.transform()
        return v2.Compose(steps + ([policy] if policy is not None else []))


class Decoder:
    """Decodes and augments batches of encoded images; one per process (the transforms are built once)."""

    def __init__(self, transform: ImageTransform, train: bool):
        self.t, self.train = transform, train
        self._pipe = transform.pipeline(train)

    def __call__(self, images: Sequence[bytes], index: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """[n] encoded images with their ids [n] -> [n, 3, S, S] uint8."""
        import torch

        s = self.t.size
        out = np.empty((len(images), 3, s, s), dtype=np.uint8)
        for i, (data, idx) in enumerate(zip(images, index)):
            if self.train:
                torch.manual_seed(sample_seed(seed, epoch, int(idx)))
            img = self._pipe(open_rgb(data))
            out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # HWC -> CHW
        return out
