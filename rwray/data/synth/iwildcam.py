"""iWildCam 2020 in the WILDS v2.0 layout (``iwildcam_v2.0/``): ``metadata.csv`` with the columns WILDS's own split
script writes (p-lambda/wilds ``dataset_preprocessing/iwildcam/create_split.py``: an unnamed index, split,
location_remapped, location, sequence_remapped, seq_id, y, category_id, datetime, filename, image_id; rows sorted by
split, location_remapped, sequence_remapped, datetime), ``categories.csv`` (y, category_id, name) and every image
under ``train/<filename>`` whatever its split.

Shape: 182 classes; train 129,809, val (OOD) 14,961, test (OOD) 42,791, id_val 7,314, id_test 8,154 images (the
WILDS paper's figures, matched by the distributed v2.0 archive). 323 camera locations split as create_split.py
does: 10 % (32) for val, 15 % (48) for test, the other 243 for train, id_val and id_test, so the OOD splits'
cameras never appear in train. Per-class train counts: a long tail from 40,000 (the 'empty' frames dominate
camera-trap data) down to 1; these two ends are not published figures, the total is. Evaluation splits follow the
train class proportions (classes may be absent from them); each split's images are spread over its cameras with
log-normal weights, in sequences of 1-10 frames a second apart.
"""

from __future__ import annotations

import csv
import hashlib
import io
from datetime import datetime, timedelta

import numpy as np

from rwray.data.synth.plan import Args, Plan, image_sizes, permuted_counts, rng_for
from rwray.data.synth.profile import proportional, scaled, train_profile

IWILDCAM = dict(classes=182, train=129_809, train_max=40_000, train_min=1, val=14_961, test=42_791, id_val=7_314,
                id_test=8_154, locations=323)
COLUMNS = ["", "split", "location_remapped", "location", "sequence_remapped", "seq_id", "y", "category_id",
           "datetime", "filename", "image_id"]
SPLITS = ("train", "val", "test", "id_val", "id_test")


def _uuid(seed: int, what: str, i: int) -> str:
    h = hashlib.md5(f"{seed}/{what}/{i}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def camera_split(n_locations: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Location indices per split: create_split.py's int(10 %) val and int(15 %) test cameras of a shuffled list, the
    rest for train, id_val and id_test (in-distribution: the train cameras)."""
    order = rng.permutation(n_locations)
    n_val, n_test = int(0.10 * n_locations), int(0.15 * n_locations)
    n_train = n_locations - n_val - n_test
    train = np.sort(order[:n_train])
    return {"train": train, "val": np.sort(order[n_train:n_train + n_val]), "test": np.sort(order[n_train + n_val:]),
            "id_val": train, "id_test": train}


def plan_iwildcam(args: Args) -> Plan:
    k = args.classes or IWILDCAM["classes"]
    rng = rng_for(args, "iwildcam")
    sorted_counts = train_profile(IWILDCAM["classes"], IWILDCAM["train"], IWILDCAM["train_max"],
                                  IWILDCAM["train_min"], args.scale, args.classes)
    train_counts = permuted_counts(sorted_counts, rng_for(args, "iwildcam/labels"))
    counts = {"train": train_counts}
    for s in SPLITS[1:]:
        counts[s] = proportional(scaled(IWILDCAM[s], args.scale), train_counts)
    # Raw ids as WILDS keeps them beside the remapped ones: category 0 ('empty') is y = 0, locations are sparse ints.
    category_ids = np.sort(np.concatenate([[0], 1 + rng.choice(max(700, 4 * k), k - 1, replace=False)]))
    raw_locations = np.sort(rng.choice(600, IWILDCAM["locations"], replace=False))
    cameras = camera_split(IWILDCAM["locations"], rng)
    rows = []  # [split, location index, seq_id, y, datetime, filename]
    serial = 0
    for split in SPLITS:
        y = np.repeat(np.arange(k), counts[split])
        y = y[rng.permutation(y.size)]
        per_loc = proportional(y.size, rng.lognormal(0.0, 1.0, cameras[split].size))
        if split == "train":  # in-distribution splits use cameras train has images of (create_split.py moves them)
            cameras["id_val"] = cameras["id_test"] = cameras["train"][per_loc > 0]
        pos = 0
        for loc, m in zip(cameras[split].tolist(), per_loc.tolist()):
            end = pos + m
            while pos < end:  # sequences of 1-10 frames at one camera, a second apart
                n = int(min(rng.integers(1, 11), end - pos))
                seq = _uuid(args.seed, "seq", serial)
                start = datetime(2013, 1, 1) + timedelta(seconds=int(rng.integers(0, 4 * 365 * 86400)))
                for j in range(n):
                    when = (start + timedelta(seconds=j)).strftime("%Y-%m-%d %H:%M:%S.000")
                    rows.append([split, loc, seq, int(y[pos + j]), when, f"{_uuid(args.seed, 'img', serial + j)}.jpg"])
                serial += n
                pos += n
    # Remapped ids are ranks among the ids present (WILDS asserts them contiguous; a small scale leaves cameras empty).
    seq_rank = {s: r for r, s in enumerate(sorted({r[2] for r in rows}))}
    loc_rank = {v: r for r, v in enumerate(sorted({r[1] for r in rows}))}
    rows.sort(key=lambda r: (r[0], r[1], seq_rank[r[2]], r[4]))  # pandas sorts the split names as strings too
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for pos, (split, loc, seq, y, when, fname) in enumerate(rows):
        w.writerow([pos, split, loc_rank[loc], int(raw_locations[loc]), seq_rank[seq], seq, y, int(category_ids[y]),
                    when, fname, fname[:-4]])
    plan = Plan(num_classes=k, train_counts=[int(v) for v in train_counts])
    plan.texts["iwildcam_v2.0/metadata.csv"] = buf.getvalue()
    plan.texts["iwildcam_v2.0/categories.csv"] = "y,category_id,name\n" + "".join(
        f"{c},{int(category_ids[c])},{'empty' if c == 0 else f'species_{int(category_ids[c]):03d}'}\n"
        for c in range(k))
    files = [f"iwildcam_v2.0/train/{r[5]}" for r in rows]
    plan.add(files, np.asarray([r[3] for r in rows], dtype=np.int64), image_sizes(len(files), args, "all"))
    plan.splits = {s: int(counts[s].sum()) for s in SPLITS}
    plan.source = {"name": "iwildcam", "root": "iwildcam_v2.0"}
    return plan
