import math

import pytest
import torch

from rwray.data.augment import decode, random_crop, random_flip
from rwray.optim import ScheduleConfig, lr_factor


def test_decode_shape_and_scale():
    rows = torch.arange(2 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 48)
    x = decode(rows, (3, 4, 4))
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert torch.equal(x[1, 0, 0], rows[1, :4].float() / 255)


def test_random_crop_matches_per_image_slicing():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    # replay the offsets: the op must equal padding each image and slicing its window
    g2 = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 5, (16,), generator=g2), torch.randint(0, 5, (16,), generator=g2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])


def test_random_flip_flips_some_and_only_horizontally():
    x = torch.rand(64, 1, 4, 4)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_warmup_then_step_decay_recipe():
    cfg = ScheduleConfig(name="step", warmup_epochs=5, milestones=[160, 180], gamma=0.01)
    f = [lr_factor(cfg, e, 200) for e in (0, 4, 5, 159, 160, 179, 180)]
    assert f == [0.2, 1.0, 1.0, 1.0, 0.01, 0.01, 0.0001]


def test_cosine_after_warmup():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2)
    assert lr_factor(cfg, 0, 12) == 0.5 and lr_factor(cfg, 2, 12) == 1.0
    assert math.isclose(lr_factor(cfg, 7, 12), 0.5)


def test_step_first_trains_each_epoch_at_the_next_epochs_factor_so_a_cosine_ends_at_its_floor():
    """Balanced Meta-Softmax steps its CosineAnnealingLR(T_max=E) before each epoch: epoch e (0-based) trains at
    0.5·(1 + cos(π(e+1)/E)), the last one at 0."""
    cfg = ScheduleConfig(name="cosine", step_first=True)
    E = 10
    got = [lr_factor(cfg, e, E) for e in range(E)]
    assert got == pytest.approx([0.5 * (1 + math.cos(math.pi * (e + 1) / E)) for e in range(E)])
    assert got[-1] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(ScheduleConfig(name="cosine"), 0, E) == 1.0  # the default: the first epoch at the full lr


def test_delay_epochs_start_the_schedule_after_the_untrained_epochs():
    """5 g-only epochs, then f's 80 under StepLR(20, 0.1) as the ReBias code runs them: milestones count from f's
    first epoch, and a cosine spans f's epochs only."""
    step = ScheduleConfig(name="step", milestones=[20, 40, 60], delay_epochs=5)
    assert [lr_factor(step, e, 85) for e in (0, 4, 5, 24, 25, 45, 65, 84)] == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.01, 0.001, 0.001])
    cos = ScheduleConfig(name="cosine", delay_epochs=30)
    assert lr_factor(cos, 30, 150) == 1.0 and lr_factor(cos, 90, 150) == pytest.approx(0.5)


def test_classifier_lr_puts_the_head_in_its_own_group_and_both_follow_the_schedule():
    from torch import nn

    from rwray.optim import OptimConfig, build_optimizer, build_scheduler

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    model.fc = nn.Linear(8, 3)
    opt = build_optimizer(OptimConfig(lr=0.001, classifier_lr=0.1), model.parameters(), model.fc.parameters())
    backbone, head = opt.param_groups
    assert [p.shape for p in head["params"]] == [(3, 8), (3,)] and len(backbone["params"]) == 2
    sched = build_scheduler(ScheduleConfig(name="cosine", min_lr=1e-4), opt, 4)
    lrs = []
    for _ in range(4):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    # cosine over 4 epochs from each group's own lr, down to the same absolute floor 1e-4
    for (b, h), e in zip(lrs, range(4)):
        f = 0.5 * (1 + math.cos(math.pi * e / 4))
        assert math.isclose(b, 1e-4 + (0.001 - 1e-4) * f) and math.isclose(h, 1e-4 + (0.1 - 1e-4) * f)
    # the head alone trainable (a decoupled stage): one group, at classifier_lr
    for p in model[0].parameters():
        p.requires_grad_(False)
    (only,) = build_optimizer(OptimConfig(lr=0.001, classifier_lr=0.1), model.parameters(),
                              model.fc.parameters()).param_groups
    assert only["lr"] == 0.1 and len(only["params"]) == 2
