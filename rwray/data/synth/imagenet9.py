"""ReBias's 9-class ImageNet (Bahng et al. 2020; clovaai/rebias ``datasets/imagenet.py``) as the reader finds it: an
ImageNet folder ``imagenet/{train,val}/`` with all 1,000 sorted wnid folders, images only in the 42 wnids the nine
super-classes use (ImageNet's 1,300 train and 50 val images per wnid; a few real classes have fewer train images),
train files ``<wnid>_<n>.JPEG``, val files ``ILSVRC2012_val_<8 digits>.JPEG`` in class folders; an ImageNet-A folder
``imagenet-a/<wnid>/`` for the 21 of the 42 wnids ImageNet-A has (its 200 wnids as sorted-ImageNet indices: the
``indices_in_1k`` list of hendrycks/natural-adv-examples; 7,500 images over 200 classes, so 37 or 38 per wnid: its
per-class counts are not published as text); and the seed's ``9class_imagenet_val.csv`` layout
(``path,category,cluster1,cluster2,cluster3``, paths ``<wnid>/<file>``) with seeded cluster ids in 0..8.

Images are drawn with their super-class's signature (the nine labels are the learnable ones). No --classes: the
reader's nine super-classes are index ranges into the 1,000 sorted wnids.
"""

from __future__ import annotations

import numpy as np

from rwray.data.imagesources.imagenet9 import CLASSES, super_class_of_index
from rwray.data.synth.plan import Args, Plan, hex_names, image_sizes, rng_for, wnids
from rwray.data.synth.profile import scaled, spread

IMAGENET9 = dict(classes=9, train_per_wnid=1300, val_per_wnid=50, imagenet_a=7_500, imagenet_a_classes=200,
                 val_per_class=50)
# ImageNet-A's 200 classes as indices into the 1,000 sorted ImageNet wnids (hendrycks/natural-adv-examples)
IMAGENET_A = [
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107, 108,
    110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301, 306, 307,
    308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386,
    397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483,
    486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606,
    607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758,
    763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845,
    847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954,
    956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988]


def plan_imagenet9(args: Args) -> Plan:
    names = wnids(1000)
    label_of = super_class_of_index()  # sorted-wnid index -> super-class, 42 entries
    chosen = sorted(label_of)
    n_train, n_val = scaled(IMAGENET9["train_per_wnid"], args.scale), scaled(IMAGENET9["val_per_wnid"], args.scale)
    a_all = spread(scaled(IMAGENET9["imagenet_a"], args.scale), len(IMAGENET_A), rng_for(args, "imagenet9/a"))
    a_count = {i: max(1, int(n)) for i, n in zip(IMAGENET_A, a_all) if i in label_of}
    plan = Plan(num_classes=len(CLASSES))
    plan.dirs = [f"imagenet/{s}/{w}" for s in ("train", "val") for w in names]
    val_ids = 1 + rng_for(args, "imagenet9/val-ids").permutation(n_val * len(chosen))
    clusters = rng_for(args, "imagenet9/clusters").integers(0, 9, (n_val * len(chosen), 3))
    a_names = iter(hex_names(sum(a_count.values()), args.seed, "imagenet-a", 16))
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], []), "imagenet_a": ([], [])}
    csv_rows = ["path,category,cluster1,cluster2,cluster3"]
    for j, i in enumerate(chosen):
        w, c = names[i], label_of[i]
        parts["train"][0].extend(f"imagenet/train/{w}/{w}_{n}.JPEG" for n in range(1, n_train + 1))
        parts["train"][1].extend([c] * n_train)
        for v in range(n_val):
            file = f"ILSVRC2012_val_{int(val_ids[j * n_val + v]):08d}.JPEG"
            parts["val"][0].append(f"imagenet/val/{w}/{file}")
            parts["val"][1].append(c)
            csv_rows.append(f"{w}/{file},{CLASSES[c]},{','.join(str(int(x)) for x in clusters[j * n_val + v])}")
        n_a = a_count.get(i, 0)
        parts["imagenet_a"][0].extend(f"imagenet-a/{w}/{next(a_names)}.jpg" for _ in range(n_a))
        parts["imagenet_a"][1].extend([c] * n_a)
    for split, (files, labels) in parts.items():
        plan.add(files, np.asarray(labels, dtype=np.int64), image_sizes(len(files), args, split))
        plan.splits[split] = len(files)
    plan.texts["9class_imagenet_val.csv"] = "\n".join(csv_rows) + "\n"
    plan.train_counts = [int(v) for v in np.bincount(parts["train"][1], minlength=len(CLASSES))]
    # The reader moves val_per_class train images of each super-class to val: the jobs' 50, or at a small scale a
    # fifth of the smallest super-class (so val never outgrows train).
    val_per_class = min(IMAGENET9["val_per_class"], max(1, min(plan.train_counts) // 5))
    plan.source = {"name": "imagenet9", "root": "imagenet", "imagenet_a_root": "imagenet-a",
                   "clusters_csv": "9class_imagenet_val.csv", "val_per_class": val_per_class,
                   "seed": args.seed}
    if val_per_class != IMAGENET9["val_per_class"]:
        plan.notes.append(f"val_per_class={val_per_class} (the jobs' 50 is more than a fifth of the smallest "
                          "super-class's train images at this scale)")
    return plan
