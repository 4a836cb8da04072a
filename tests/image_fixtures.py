"""Tiny datasets in the real on-disk formats read by `rwray.data.imagesources` (a plain module, not a conftest).

Every image is a real JPEG (PIL), a flat colour per class plus seeded noise, so a model can learn it. Each writer
returns {"root", "params" (for the source's Params), "counts" (per split), "classes", ...}: what a test asserts on.
"""

from __future__ import annotations

import colorsys
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (24, 32)  # (height, width): tiny, non-square (a resize bug shows)


def write_image(path: Path, label: int, num_classes: int, rng: np.random.Generator, size=SIZE) -> None:
    """Class colour (evenly spaced hues) + uniform noise in [-24, 24]; the format follows the extension."""
    rgb = np.array(colorsys.hsv_to_rgb(label / num_classes, 0.8, 0.85)) * 255
    img = np.clip(rgb + rng.integers(-24, 25, (*size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def corrupt_image(path: Path, keep: int = 40) -> None:
    """Truncate an image to its first ``keep`` bytes: the header survives, decoding fails."""
    path.write_bytes(path.read_bytes()[:keep])


def _wnids(n: int) -> list[str]:
    return [f"n{i:08d}" for i in range(n)]  # synthetic, already sorted like ImageNet's


def write_image_folder(root: Path, num_classes=3, per_class=(6, 2, 2), seed=0) -> dict:
    """root/{train,val,test}/<class>/: mixed .jpg / .JPEG / .png names, plus a README.txt the reader must skip."""
    rng, classes = np.random.default_rng(seed), [f"class_{c}" for c in range(num_classes)]
    for split, n in zip(("train", "val", "test"), per_class):
        for c, cls in enumerate(classes):
            for i in range(n):
                write_image(root / split / cls / f"{i:03d}{('.jpg', '.JPEG', '.png')[i % 3]}", c, num_classes, rng)
    (root / "train" / classes[0] / "README.txt").write_text("not an image")
    counts = {s: n * num_classes for s, n in zip(("train", "val", "test"), per_class)}
    return {"root": root, "params": {"name": "image_folder", "root": str(root)}, "counts": counts, "classes": classes}


def _write_list(path: Path, lines: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{rel} {y}\n" for rel, y in lines))


def write_image_list(root: Path, num_classes=4, per_class=(6, 2, 2), seed=0) -> dict:
    """root/imgs/<class>/*.jpg, root/lists/{train,val,test}.txt (`relpath label`, a blank line too), classes.txt."""
    rng, classes = np.random.default_rng(seed), [f"thing{c}" for c in range(num_classes)]
    counts = {}
    for split, n in zip(("train", "val", "test"), per_class):
        lines = [(f"imgs/{classes[c]}/{split}_{i}.jpg", c) for c in range(num_classes) for i in range(n)]
        for rel, c in lines:
            write_image(root / rel, c, num_classes, rng)
        _write_list(root / "lists" / f"{split}.txt", lines[:1] + [("", "")] + lines[1:])
        counts[split] = len(lines)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    params = {"name": "image_list", "root": str(root), "train_list": "lists/train.txt", "val_list": "lists/val.txt",
              "test_list": "lists/test.txt", "classes_file": "classes.txt"}
    return {"root": root, "params": params, "counts": counts, "classes": classes}


def write_oltr(root: Path, prefix="ImageNet_LT", num_classes=5, per_class=(12, 3, 3), imbalance=0.2, seed=0) -> dict:
    """OLTR lists in root/<prefix>/ over an image folder root/images/: train (long-tailed: n_c = 12 * 0.2^(c/(K-1)))
    and val from train/<class>/, test from val/<class>/ (ImageNet-LT's test set is ImageNet's val)."""
    rng = np.random.default_rng(seed)
    places = prefix == "Places_LT"
    classes = [f"scene_{c}" for c in range(num_classes)] if places else _wnids(num_classes)
    images, lists = root / "images", root / prefix
    n_train = [max(1, round(per_class[0] * imbalance ** (c / max(1, num_classes - 1)))) for c in range(num_classes)]
    counts = {}
    for split, folder in (("train", "train"), ("val", "train"), ("test", "val")):
        lines = []
        for c, cls in enumerate(classes):
            n = n_train[c] if split == "train" else per_class[1 if split == "val" else 2]
            stem = f"Places365_val_{{:08d}}.jpg" if places and folder == "val" else f"{cls}_{split}_{{}}.JPEG"
            lines += [(f"{folder}/{cls}/{stem.format(c * 100 + i)}", c) for i in range(n)]
        for rel, c in lines:
            write_image(images / rel, c, num_classes, rng)
        _write_list(lists / f"{prefix}_{split}.txt", lines)
        counts[split] = len(lines)
    params = {"name": prefix.lower(), "root": str(lists), "image_root": str(images), "num_classes": num_classes}
    return {"root": lists, "params": params, "counts": counts, "classes": classes, "train_per_class": n_train}


def write_imagenet_lt(root: Path, **kw) -> dict:
    return write_oltr(root, "ImageNet_LT", **kw)


def write_places_lt(root: Path, **kw) -> dict:
    return write_oltr(root, "Places_LT", **kw)


def write_inat2018(root: Path, train_per_class=(24, 14, 8, 5), test_per_class=3, seed=0) -> dict:
    """train2018.json / val2018.json (COCO style) over root/train_val2018/<kingdom>/<category>/<name>.jpg; image ids
    unique across both files. With val_min_train=10, val_per_class=2: classes 0 and 1 give 2 val images each."""
    rng, k = np.random.default_rng(seed), len(train_per_class)
    cats = [{"id": c, "name": f"Species {c}", "supercategory": "Plantae"} for c in range(k)]
    next_id, counts = [1000], {}
    for fname, per in (("train2018.json", train_per_class), ("val2018.json", [test_per_class] * k)):
        images, anns = [], []
        for c, n in enumerate(per):
            for _ in range(n):
                rel = f"train_val2018/Plantae/{c}/{next_id[0]:06x}.jpg"
                write_image(root / rel, c, k, rng)
                images.append({"id": next_id[0], "file_name": rel, "width": SIZE[1], "height": SIZE[0]})
                anns.append({"id": next_id[0], "image_id": next_id[0], "category_id": c})
                next_id[0] += 7  # non-contiguous ids: index must be the id, not the position
        (root / fname).write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}, indent=1))
        counts[fname] = len(images)
    val = 2 * sum(n >= 10 for n in train_per_class)
    params = {"name": "inat2018", "root": str(root), "val_per_class": 2, "val_min_train": 10, "seed": seed}
    counts = {"train": counts["train2018.json"] - val, "val": val, "test": counts["val2018.json"]}
    return {"root": root, "params": params, "counts": counts, "classes": [c["name"] for c in cats]}


CLOTHING_NAMES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket",
                  "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]


def write_clothing1m(root: Path, noisy_per_class=4, clean_per_class=(1, 1, 2), noise=0.3, known=10, seed=0) -> dict:
    """images/<a>/<bb>/<n>.jpg (coloured by the true class); noisy_label_kv.txt holds the noisy train keys with
    ~30 % flipped labels, clean_label_kv.txt the clean train / val / test keys and ``known`` noisy train keys."""
    rng, k = np.random.default_rng(seed), len(CLOTHING_NAMES)
    serial = iter(range(10**6))

    def make(c: int) -> str:
        n = next(serial)
        rel = f"images/{n % 10}/{n % 100:02d}/{n}.jpg"
        write_image(root / rel, c, k, rng)
        return rel

    noisy = [(make(c), c) for c in range(k) for _ in range(noisy_per_class)]
    flip = rng.random(len(noisy)) < noise
    noisy_kv = [(rel, int((c + rng.integers(1, k)) % k) if f else c) for (rel, c), f in zip(noisy, flip)]
    clean = {s: [(make(c), c) for c in range(k) for _ in range(n)] for s, n in zip(("train", "val", "test"),
                                                                                   clean_per_class)}
    _write_list(root / "noisy_label_kv.txt", noisy_kv)
    _write_list(root / "clean_label_kv.txt", [p for s in clean.values() for p in s] + noisy[:known])
    (root / "noisy_train_key_list.txt").write_text("".join(f"{rel}\n" for rel, _ in noisy))
    for s, pairs in clean.items():
        (root / f"clean_{s}_key_list.txt").write_text("".join(f"{rel}\n" for rel, _ in pairs))
    (root / "category_names_eng.txt").write_text("\n".join(CLOTHING_NAMES) + "\n")
    counts = {"train": len(noisy), "val": len(clean["val"]), "test": len(clean["test"])}
    return {"root": root, "params": {"name": "clothing1m", "root": str(root)}, "counts": counts,
            "classes": CLOTHING_NAMES, "noisy_labels": [y for _, y in noisy_kv], "true_labels": [y for _, y in noisy],
            "known": known, "clean_train": len(clean["train"])}


# The seed's selection written out (clovaai/rebias datasets/imagenet.py: RESTRICTED_RANGES, inclusive, with dog,
# bird and monkey cut to the ImageNet-A overlap), independently of the reader's table: 42 sorted-wnid indices.
IMAGENET9_CLASSES = ["dog", "cat", "frog", "turtle", "bird", "monkey", "fish", "crab", "insect"]
IMAGENET9_INDICES = [(151, 207, 234, 235, 254), range(281, 286), range(30, 33), range(33, 38), (89, 90, 94, 96, 97),
                     (372, 373, 374, 375, 378), range(393, 398), range(118, 122), range(306, 311)]


def write_imagenet9(root: Path, per_wnid=(3, 2), imagenet_a=True, clusters=True, seed=0) -> dict:
    """root/imagenet/{train,val}/ with all 1000 synthetic wnid folders (images only in the 42 selected ones),
    root/imagenet-a/ (10 selected wnids + 2 others), root/9class_imagenet_val.csv in the seed's format
    (``path,category,cluster1,cluster2,cluster3``, paths ``<wnid>/<file>``, shuffled rows; two test images left
    out, one row for a file that is not there)."""
    rng, wnids, net = np.random.default_rng(seed), _wnids(1000), root / "imagenet"
    chosen = {wnids[i]: c for c, idx in enumerate(IMAGENET9_INDICES) for i in idx}
    for w in wnids:
        (net / "train" / w).mkdir(parents=True)
        (net / "val" / w).mkdir(parents=True)
    rows = []
    for w, c in sorted(chosen.items()):
        for i in range(per_wnid[0]):
            write_image(net / "train" / w / f"{w}_{i}.JPEG", c, 9, rng)
        for i in range(per_wnid[1]):
            name = f"ILSVRC2012_val_{int(w[1:]) * 10 + i:08d}.JPEG"
            write_image(net / "val" / w / name, c, 9, rng)
            rows.append([f"{w}/{name}", IMAGENET9_CLASSES[c], *rng.integers(0, 9, 3).tolist()])
    order = rng.permutation(len(rows))
    kept = [rows[i] for i in order[2:]] + [["n00000151/ILSVRC2012_val_99999999.JPEG", "dog", 0, 0, 0]]
    params = {"name": "imagenet9", "root": str(net), "val_per_class": 2, "seed": seed}
    a_count = 0
    if imagenet_a:
        for w in sorted(chosen)[::4][:10] + wnids[:2]:
            write_image(root / "imagenet-a" / w / f"{w}_a.jpg", chosen.get(w, 0), 9, rng)
            a_count += w in chosen
        params["imagenet_a_root"] = str(root / "imagenet-a")
    if clusters:
        with open(root / "9class_imagenet_val.csv", "w", newline="") as f:
            csv.writer(f).writerows([["path", "category", "cluster1", "cluster2", "cluster3"], *kept])
        params["clusters_csv"] = str(root / "9class_imagenet_val.csv")
    n_train = len(chosen) * per_wnid[0]
    counts = {"train": n_train - 9 * 2, "val": 9 * 2, "test": len(rows)}
    if imagenet_a:
        counts["imagenet_a"] = a_count
    return {"root": net, "params": params, "counts": counts, "classes": IMAGENET9_CLASSES, "wnids": chosen,
            "clusters": {r[0]: tuple(r[2:]) for r in kept}}


def write_iwildcam(root: Path, categories=(0, 3, 7, 12), with_y=True, seed=0) -> dict:
    """iwildcam_v2.0/: metadata.csv (WILDS v2 columns: an unnamed index, split, location_remapped, location,
    sequence_remapped, datetime, filename, y, category_id) and train/<filename> for every split. Train / id_val /
    id_test from locations 0-2, val from 3, test from 4-5 (OOD by camera)."""
    rng, k = np.random.default_rng(seed), len(categories)
    plan = [("train", (0, 1, 2), 30), ("val", (3,), 8), ("test", (4, 5), 8), ("id_val", (0, 1, 2), 6),
            ("id_test", (0, 1, 2), 6)]
    raw_locations = [15, 27, 40, 88, 101, 230]  # WILDS's raw camera ids; location_remapped = their rank
    header = ["", "split", "location_remapped", "location", "sequence_remapped", "datetime", "filename", "y",
              "category_id"]
    rows, counts = [], {}
    for split, locs, n in plan:
        for i in range(n):
            y, loc = i % k, locs[i % len(locs)]
            name = f"{len(rows):04d}-{rng.integers(16**8):08x}.jpg"
            write_image(root / "train" / name, y, k, rng)
            rows.append([len(rows), split, loc, raw_locations[loc], len(rows) // 3, "2013-06-09 16:37:34.000",
                         name, y, categories[y]])
        counts[split] = n
    if not with_y:  # the v1.0-style table: category ids only, labels by sorted unique id
        header, rows = header[:-2] + header[-1:], [r[:-2] + r[-1:] for r in rows]
    with open(root / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return {"root": root, "params": {"name": "iwildcam", "root": str(root)}, "counts": counts,
            "classes": [str(c) for c in categories], "rows": rows}
