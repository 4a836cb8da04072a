"""The seeds' augmentations: AutoAugment / RandAugment per sample (torchvision's own transforms, seeded by
(seed, epoch, index)), Cutout against the reference implementation's arithmetic, mixup / CutMix against their
formulas, and the mixed per-sample loss."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import job
from torchvision.transforms import v2

from rwray.data.augment import Mix, cutmix, cutout, mixup
from rwray.data.decode import Decoder, ImageTransform
from rwray.data.policy import Policy, array_pipeline, per_sample, sample_seed
from rwray.datainfo import DataInfo
from rwray.losses import LOSSES
from rwray.losses.ce import CEParams
from rwray.losses.ldam import LDAMParams
from rwray.methods import METHODS, StepInputs
from rwray.methods.absgd import ABSGDParams
from rwray.methods.base import sample_losses
from rwray.methods.erm import ERMParams
from rwray.train.batches import Augmentation, Images

INFO = DataInfo(4, (30, 20, 10, 5), (3, 16, 16), 65)


def u8(n: int, c: int = 3, s: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------ per-sample policy

@pytest.mark.parametrize("policy", [Policy("autoaugment", "cifar10"), Policy("autoaugment", "svhn"),
                                    Policy("randaugment", ops=2, magnitude=9)])
def test_a_policy_is_torchvisions_transform_seeded_by_seed_epoch_and_index(policy):
    images, index = u8(6), torch.tensor([5, 17, 2, 40, 41, 9])
    pipe = array_pipeline(policy, "crop_flip", 4, (16, 16))
    out = per_sample(pipe, images, index, seed=3, epoch=2)
    ref_t = v2.Compose([v2.RandomCrop((16, 16), padding=4), v2.RandomHorizontalFlip(), policy.transform()])
    for b, i in enumerate(index.tolist()):
        torch.manual_seed(sample_seed(3, 2, i))
        assert torch.equal(out[b], ref_t(images[b]))
    # a sample's augmentation depends on nothing else: not its batch, not its position in it
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(per_sample(pipe, images[perm], index[perm], 3, 2), out[perm])
    assert torch.equal(per_sample(pipe, images[:2], index[:2], 3, 2), out[:2])
    # another epoch draws again; the policy changed pixels
    assert not torch.equal(per_sample(pipe, images, index, 3, 3), out)
    assert not torch.equal(out, images)


def test_the_per_sample_policy_leaves_the_global_generator_where_it_was():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    per_sample(array_pipeline(Policy("autoaugment"), "none", 0, (16, 16)), u8(4), torch.arange(4), 0, 0)
    assert torch.equal(torch.rand(3), expected)  # dropout and method randomness do not see the policy's draws


def test_a_policy_runs_on_one_channel_images():
    out = per_sample(array_pipeline(Policy("randaugment", ops=3, magnitude=15), "flip", 0, (8, 8)),
                     u8(5, c=1, s=8), torch.arange(5), 0, 0)
    assert out.shape == (5, 1, 8, 8) and out.dtype == torch.uint8


def test_encoded_images_get_the_policy_after_their_crop_in_the_decoder():
    from PIL import Image

    rng = np.random.default_rng(0)
    data = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(buf, format="JPEG")
        data.append(buf.getvalue())
    policy = Policy("autoaugment", "imagenet")
    t = ImageTransform(24, 28, "rrc_flip", 0.4, policy=policy)
    out = Decoder(t, train=True)(data, np.array([7, 8, 9]), seed=1, epoch=4)
    plain = Decoder(ImageTransform(24, 28, "rrc_flip", 0.4), train=True)(data, np.array([7, 8, 9]), 1, 4)
    ref = v2.Compose([v2.RandomResizedCrop(24, scale=(0.08, 1.0)), v2.RandomHorizontalFlip(),
                      v2.ColorJitter(0.4, 0.4, 0.4, 0), policy.transform()])
    for b, i in enumerate([7, 8, 9]):
        torch.manual_seed(sample_seed(1, 4, i))
        img = ref(Image.open(io.BytesIO(data[b])).convert("RGB"))
        assert np.array_equal(out[b], np.asarray(img).transpose(2, 0, 1))
    assert not np.array_equal(out, plain)
    # evaluation never augments
    evaluated = Decoder(t, train=False)(data, np.array([7, 8, 9]), 1, 4)
    assert np.array_equal(evaluated, Decoder(ImageTransform(24, 28), train=False)(data, np.array([7, 8, 9]), 0, 0))


# ------------------------------------------------------------------------------------------------ Cutout

def reference_cutout(img: np.ndarray, length: int, cy: int, cx: int) -> np.ndarray:
    """DeVries & Taylor's Cutout (n_holes=1) written as their code does, with the centre given."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(cy - length // 2, 0, h), np.clip(cy + length // 2, 0, h)
    x1, x2 = np.clip(cx - length // 2, 0, w), np.clip(cx + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return img * mask[None]


@pytest.mark.parametrize("length", [1, 4, 5, 16, 40])
def test_cutout_zeroes_the_reference_square_around_the_drawn_centre(length):
    x = torch.rand(16, 3, 12, 10, generator=torch.Generator().manual_seed(2)) + 0.1  # no zero pixel before
    out = cutout(x, length, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the draws: centres row, then column, one per image
    cy = torch.randint(0, 12, (16, 1), generator=g)[:, 0]
    cx = torch.randint(0, 10, (16, 1), generator=g)[:, 0]
    for b in range(16):
        ref = reference_cutout(x[b].numpy(), length, int(cy[b]), int(cx[b]))
        np.testing.assert_array_equal(out[b].numpy(), ref)
    if length == 40:  # the square covers the whole image from any centre only when it is twice the image's side
        assert (out == 0).float().mean() > 0.2
    assert torch.equal(cutout(x, 0, g), x)


# ------------------------------------------------------------------------------------------------ mixup / CutMix

def test_mixup_is_the_convex_combination_with_one_beta_draw_per_batch():
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8) % 4
    mixed, mix = mixup(x, y, 0.4, torch.Generator().manual_seed(3))
    lam = float(mix.lam[0])
    assert torch.all(mix.lam == lam) and 0.0 <= lam <= 1.0
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mix.y2, y[perm])
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    # λ ~ Beta(α, α): mean 1/2, and α = 0.2 piles its draws near 0 and 1 (variance 1/(4(2α+1)) = 0.178)
    lams = torch.tensor([float(mixup(x, y, 0.2, torch.Generator().manual_seed(s))[1].lam[0]) for s in range(600)])
    assert abs(float(lams.mean()) - 0.5) < 0.05 and abs(float(lams.var()) - 1 / (4 * 1.4)) < 0.03


def test_cutmix_pastes_one_box_and_lambda_is_the_share_of_pixels_kept():
    x, y = torch.rand(6, 2, 10, 8), torch.arange(6)
    for s in range(20):
        mixed, mix = cutmix(x, y, 1.0, torch.Generator().manual_seed(s))
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(s))
        assert torch.equal(mix.y2, y[perm])
        from_other = (mixed == x[perm]) & (mixed != x)  # [B, C, H, W] pixels taken from the partner
        box = from_other.any(0).any(0)  # [H, W]
        if not box.any():  # an empty box (λ = 1) or a sample paired with itself everywhere
            assert float(mix.lam[0]) == 1.0 or torch.equal(perm, torch.arange(6))
            continue
        rows, cols = box.any(1).nonzero()[:, 0], box.any(0).nonzero()[:, 0]
        area = (int(rows.max()) - int(rows.min()) + 1) * (int(cols.max()) - int(cols.min()) + 1)
        assert int(box.sum()) == area  # one rectangle
        assert float(mix.lam[0]) == pytest.approx(1 - area / 80)
        keep = ~box
        assert torch.equal(mixed[:, :, keep], x[:, :, keep])


# ------------------------------------------------------------------------------------------------ mixed losses

def step_inputs(logits, y, mix=None):
    return StepInputs(None, torch.zeros(len(y), 1), y, torch.arange(len(y)), logits, torch.zeros(len(y), 2), 0, 0,
                      {}, mix)


def test_the_mixed_ce_is_ce_against_the_mixed_one_hot_target():
    g = torch.Generator().manual_seed(0)
    z, y, y2 = torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3])
    lam = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0])
    ce = LOSSES.build(CEParams(), INFO)
    got = sample_losses(ce, step_inputs(z, y, Mix(y2, lam)))
    soft = lam[:, None] * F.one_hot(y, 4) + (1 - lam[:, None]) * F.one_hot(y2, 4)
    torch.testing.assert_close(got, F.cross_entropy(z, soft.float(), reduction="none"))
    torch.testing.assert_close(sample_losses(ce, step_inputs(z, y)), F.cross_entropy(z, y, reduction="none"))
    # any per-sample loss mixes the same way, e.g. LDAM's margins on each target
    ldam = LOSSES.build(LDAMParams(), INFO)
    torch.testing.assert_close(sample_losses(ldam, step_inputs(z, y, Mix(y2, lam))),
                               lam * ldam(z, y) + (1 - lam) * ldam(z, y2))


def test_erm_and_absgd_train_on_mixed_losses_and_the_others_say_they_do_not():
    z, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    mix = Mix(torch.tensor([1, 0, 3, 2]), torch.full((4,), 0.25))
    ce = F.cross_entropy(z, y, reduction="none")
    mixed = 0.25 * ce + 0.75 * F.cross_entropy(z, mix.y2, reduction="none")
    out = METHODS.build(ERMParams(), INFO).step(step_inputs(z, y, mix))
    torch.testing.assert_close(out.losses, mixed)
    absgd = METHODS.build(ABSGDParams(lam=1.0, gamma=1.0), INFO)
    absgd.begin_epoch(0)
    out = absgd.step(step_inputs(z, y, mix))
    torch.testing.assert_close(out.losses, mixed)
    w = torch.exp(mixed / 1.0)
    torch.testing.assert_close(out.weights, w / w.mean())  # γ = 1: u is the batch mean of exp(ℓ/λ)
    supported = {e.name for e in METHODS.entries() if getattr(e.build, "supports_mix", False)}
    assert supported == {"erm", "absgd"}


# ------------------------------------------------------------------------------------------------ Images, end to end

def test_train_batches_get_geometry_policy_cutout_and_mix_in_that_order():
    info = DataInfo(4, (3, 3, 3, 3), (3, 16, 16), 12)
    aug = Augmentation("crop_flip", 4, Policy("autoaugment"), cutout=6, mix="mixup", mix_alpha=1.0)
    images = Images(info, [0.5] * 3, [0.25] * 3, torch.device("cpu"), aug=aug)
    raw = u8(4)
    rows = {"image": raw.reshape(4, -1), "label": torch.tensor([0, 1, 2, 3]), "index": torch.tensor([8, 1, 6, 3])}
    b = images(rows, train=True, generator=torch.Generator().manual_seed(9), seed=2, epoch=1)
    g = torch.Generator().manual_seed(9)
    x = per_sample(array_pipeline(aug.policy, "crop_flip", 4, (16, 16)), raw, rows["index"], 2, 1).float() / 255
    x, mix = mixup(cutout(x, 6, g), rows["label"], 1.0, g)
    torch.testing.assert_close(b.x, (x - 0.5) / 0.25)
    assert torch.equal(b.mix.y2, mix.y2) and torch.equal(b.mix.lam, mix.lam)
    plain = images(rows)  # evaluation: none of it
    torch.testing.assert_close(plain.x, (raw.float() / 255 - 0.5) / 0.25)
    assert plain.mix is None


@pytest.mark.ray
def test_a_run_with_the_seeds_augmentations_trains_and_replays_exactly(tmp_path, digits_dir, ray_local):
    """AutoAugment + Cutout + CutMix under ABSGD on two workers: the run finishes, and running it again gives the
    same losses and accuracies to the last bit (every draw is a function of the seed, epoch, step and index)."""
    from rwray.train.launch import run

    d = {"augment": "crop_flip", "crop_padding": 2, "policy": "autoaugment", "cutout": 4, "mix": "cutmix"}
    m = {"name": "absgd", "lam": 2.0}
    keys = ("train/loss", "train/mean_weight", "val/balanced_acc", "test/top1")
    a = run(job(tmp_path / "a", digits_dir, data=d, method=m, train={"epochs": 1}))
    b = run(job(tmp_path / "b", digits_dir, data=d, method=m, train={"epochs": 1}))
    assert {k: a.metrics[k] for k in keys} == {k: b.metrics[k] for k in keys}
    assert np.isfinite(a.metrics["train/loss"]) and 0 <= a.metrics["test/top1"] <= 1
    plain = run(job(tmp_path / "c", digits_dir, method=m, train={"epochs": 1}))
    assert plain.metrics["train/loss"] != a.metrics["train/loss"]
