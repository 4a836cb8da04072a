"""Per-sample augmentation policies (torchvision's AutoAugment and RandAugment) and the per-sample seed.

A policy picks its operations and magnitudes per image, so it runs image by image on CPU (uint8 tensors of array
shards in the train process, PIL images of encoded shards in the decoding processes). Randomness is a function of
(seed, epoch, index) alone (`sample_seed`): a sample gets the same augmentation whichever process handles it, in
whatever batch, after any retry or restart. torchvision's transforms draw from torch's global generator, so that
generator is seeded per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PolicyName = Literal["none", "autoaugment", "randaugment"]
AutoAugmentSet = Literal["cifar10", "imagenet", "svhn"]  # the three policies searched by Cubuk et al. (2019)

_MASK = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index): splitmix64 over the three, so nearby ids get unrelated streams.
    Never Python's hash() (salted per process)."""
    x = 0
    for v in (seed, epoch, index):
        x = (x ^ (v & _MASK)) + 0x9E3779B97F4A7C15 & _MASK
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
        x ^= x >> 31
    return x >> 1


@dataclass(frozen=True)
class Policy:
    """Which policy, with its settings; picklable, so decoding actors build the same transform."""

    name: PolicyName = "none"
    autoaugment: AutoAugmentSet = "cifar10"  # AutoAugment's learned policy set
    ops: int = 2  # RandAugment: operations per image (N)
    magnitude: int = 9  # RandAugment: shared magnitude (M) on torchvision's 31-bin scale

    def transform(self):
        """The torchvision v2 transform (uint8 tensors and PIL images alike), or None."""
        from torchvision.transforms import v2

        if self.name == "autoaugment":
            return v2.AutoAugment(v2.AutoAugmentPolicy(self.autoaugment))
        if self.name == "randaugment":
            return v2.RandAugment(num_ops=self.ops, magnitude=self.magnitude)
        return None


def array_pipeline(policy: Policy, kind: str, padding: int, size: int):
    """The per-sample train pipeline of array shards when a policy is on, in the seeds' order (e.g. the Balanced
    Meta-Softmax CIFAR recipe: RandomCrop(padding) → flip → AutoAugment): ``kind`` is data.augment's geometry."""
    from torchvision.transforms import v2

    steps = []
    if kind == "crop_flip" and padding > 0:
        steps.append(v2.RandomCrop(size, padding=padding))
    if kind in ("flip", "crop_flip"):
        steps.append(v2.RandomHorizontalFlip())
    steps.append(policy.transform())
    return v2.Compose(steps)


def per_sample(pipe, images: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """[B, C, H, W] uint8 on CPU, ids [B] -> [B, C, H, W] uint8, image b transformed with torch's generator seeded
    by sample_seed(seed, epoch, index[b]). The caller's generator state is restored afterwards (dropout and
    anything else drawing from it are untouched)."""
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        for b, idx in enumerate(index.tolist()):
            torch.manual_seed(sample_seed(seed, epoch, idx))
            out[b] = pipe(images[b])
    return out
