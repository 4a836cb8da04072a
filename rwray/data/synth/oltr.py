"""ImageNet-LT and Places-LT (Liu et al. 2019, OLTR) as their lists and image folders are laid out.

Lists ``<Prefix>_{train,val,test}.txt`` of ``relpath label`` lines, grouped by label, with the path style of the
published lists (facebookresearch/classifier-balancing ``data/ImageNet_LT/``, ``data/Places_LT/``):

    ImageNet-LT  train, val: ``train/n01440764/n01440764_762.JPEG``       (val is carved from ImageNet train)
                 test:       ``val/n01440764/ILSVRC2012_val_00029930.JPEG`` (ImageNet val, in class folders)
    Places-LT    train, val: ``train/airfield/00004851.jpg``
                 test:       ``val/airfield/Places365_val_00003597.jpg``

Shapes (the readers' docstrings; Places-LT counted from the published lists): ImageNet-LT 1,000 classes, train
115,846 (1,280 ... 5 per class), val 20,000 (20 per class), test 50,000 (50 per class); Places-LT 365 classes, train
62,500 (4,980 ... 5), val 7,300 (20 per class), test 36,500 (100 per class). The per-class train counts follow the
long tail of `rwray.data.synth.profile`, dealt to labels by a seeded permutation (the real lists' head is not
label 0 either). Class folders: synthetic wnids ``n00000000``... (label c = the c-th sorted wnid, as in ImageNet)
and scene names ``scene_000``...
"""

from __future__ import annotations

import numpy as np

from rwray.data.synth.plan import Args, Plan, image_sizes, permuted_counts, rng_for, wnids
from rwray.data.synth.profile import scaled, spread, train_profile

IMAGENET_LT = dict(classes=1000, train=115_846, train_max=1280, train_min=5, val=20_000, test=50_000)
PLACES_LT = dict(classes=365, train=62_500, train_max=4980, train_min=5, val=7_300, test=36_500)


def _plan(args: Args, shape: dict, prefix: str, images: str, names: list[str], train_name, test_name) -> Plan:
    k = len(names)
    sorted_counts = train_profile(shape["classes"], shape["train"], shape["train_max"], shape["train_min"],
                                  args.scale, args.classes)
    train = permuted_counts(sorted_counts, rng_for(args, f"{prefix}/labels"))
    val = spread(scaled(shape["val"], args.scale), k, rng_for(args, f"{prefix}/val"))
    test = spread(scaled(shape["test"], args.scale), k, rng_for(args, f"{prefix}/test"))
    test_ids = 1 + rng_for(args, f"{prefix}/test-ids").permutation(int(test.sum()))  # unique over the whole split
    plan = Plan(num_classes=k, train_counts=[int(v) for v in train])
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}  # relpaths under the image root
    labels: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    next_test = 0
    for c, name in enumerate(names):
        n_train, n_val, n_test = int(train[c]), int(val[c]), int(test[c])
        # train and val both come from the source's train folder: one numbering, so their files never collide
        rows["train"] += [f"train/{name}/{train_name(name, i)}" for i in range(1, n_train + 1)]
        rows["val"] += [f"train/{name}/{train_name(name, i)}" for i in range(n_train + 1, n_train + n_val + 1)]
        rows["test"] += [f"val/{name}/{test_name(int(i))}" for i in test_ids[next_test:next_test + n_test]]
        next_test += n_test
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            labels[split].append(np.full(n, c, dtype=np.int64))
    for split, rels in rows.items():
        y = np.concatenate(labels[split])
        plan.texts[f"{prefix}/{prefix}_{split}.txt"] = "".join(f"{r} {c}\n" for r, c in zip(rels, y.tolist()))
        plan.add([f"{images}/{r}" for r in rels], y, image_sizes(len(rels), args, split))
        plan.splits[split] = len(rels)
    plan.source = {"name": prefix.lower(), "root": prefix, "image_root": images}
    if k != shape["classes"]:
        plan.source["num_classes"] = k
    return plan


def plan_imagenet_lt(args: Args) -> Plan:
    k = args.classes or IMAGENET_LT["classes"]
    return _plan(args, IMAGENET_LT, "ImageNet_LT", "imagenet", wnids(k), lambda w, i: f"{w}_{i}.JPEG",
                 lambda i: f"ILSVRC2012_val_{i:08d}.JPEG")


def plan_places_lt(args: Args) -> Plan:
    k = args.classes or PLACES_LT["classes"]
    return _plan(args, PLACES_LT, "Places_LT", "places365", [f"scene_{c:03d}" for c in range(k)],
                 lambda _, i: f"{i:08d}.jpg", lambda i: f"Places365_val_{i:08d}.jpg")

