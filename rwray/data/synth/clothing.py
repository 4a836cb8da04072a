"""Clothing1M (Xiao et al. 2015) as distributed: ``noisy_label_kv.txt`` / ``clean_label_kv.txt`` (``relpath label``),
the key lists ``noisy_train_key_list.txt``, ``clean_{train,val,test}_key_list.txt``, ``category_names_eng.txt`` and
``images/<a>/<bc>/<n1>,<n2>.jpg`` (the key style of the dataset's own lists, e.g.
``images/2/26/3761328114,905362226.jpg``).

Shape: 14 classes; 1,000,000 noisy train keys; clean train / val / test 47,570 / 14,313 / 10,526 keys (the dataset
README and the paper), so clean_label_kv.txt holds their 72,409 lines. noisy_label_kv.txt holds the noisy train
keys plus 37,497 keys of the clean subsets that carry a noisy label too (1,037,497 lines, the count of the
distributed file: the README's Venn figure shows the overlap as an image, not text). The noisy train keys have no
clean label, as in the real split (the reader's ``clean_label`` column is -1 for them).

Labels: the true class of every image is spread evenly over the 14 classes (the real noisy-label distribution is
not published as text). Noisy labels flip a class-dependent share of each class (scaled so the overall share is
38.46 %: the paper's noisy-label accuracy is 61.54 %), three quarters of a class's flips to its most confusable
class (Windbreaker -> Jacket, Knitwear -> Sweater, ...) and the rest spread over the others; every class keeps at
least one image with its own label. Images are drawn with the true class's signature, so the clean labels are the
learnable ones.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rwray.data.synth.plan import Args, Plan, image_sizes, rng_for
from rwray.data.synth.profile import scaled, spread

NAMES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket", "Downcoat", "Suit",
         "Shawl", "Dress", "Vest", "Underwear"]
CLOTHING = dict(classes=14, noisy_train=1_000_000, clean_train=47_570, clean_val=14_313, clean_test=10_526,
                overlap=37_497)
NOISE = 0.3846  # 1 - 61.54 %
# Relative flip rates per class (scaled to a mean of NOISE) and each class's most confusable class.
FLIP_SHAPE = np.array([0.35, 0.40, 0.50, 0.45, 0.48, 0.30, 0.42, 0.45, 0.25, 0.30, 0.30, 0.28, 0.40, 0.30])
PARTNER = [1, 0, 4, 11, 2, 4, 7, 6, 7, 7, 2, 3, 0, 12]
TO_PARTNER = 0.75


def flip_counts(n: int, c: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[K] how many of class c's ``n`` images get each noisy label (sums to n; entry c = those kept clean)."""
    rate = FLIP_SHAPE[c] * NOISE / FLIP_SHAPE.mean()
    flips = min(int(np.floor(rate * n + 0.5)), n - 1) if n else 0
    out = np.zeros(k, dtype=np.int64)
    out[c] = n - flips
    to_partner = int(np.floor(TO_PARTNER * flips + 0.5))
    out[PARTNER[c]] += to_partner
    others = [j for j in range(k) if j not in (c, PARTNER[c])]
    out[others] += spread(flips - to_partner, len(others), rng)
    return out


def noisy_labels(true: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """[N] noisy labels of images whose true classes are ``true`` [N]: per class, `flip_counts` dealt to that class's
    images by a seeded permutation."""
    out = true.copy()
    for c in range(k):
        idx = np.flatnonzero(true == c)
        if idx.size:
            out[rng.permutation(idx)] = np.repeat(np.arange(k), flip_counts(idx.size, c, k, rng))
    return out


def keys(start: int, n: int, seed: int) -> list[str]:
    """Keys ``images/<a>/<bc>/<n1>,<n2>.jpg`` of images start..start+n-1 (distinct: the index picks the folder and
    seeds the name)."""
    out = []
    for i in range(start, start + n):
        h = hashlib.md5(f"{seed}/clothing1m/{i}".encode()).digest()
        n1, n2 = int.from_bytes(h[:4], "little"), int.from_bytes(h[4:8], "little") >> 1
        out.append(f"images/{i % 10}/{(i // 10) % 100:02d}/{n1},{n2}.jpg")
    return out


def _lines(pairs) -> str:
    return "".join(f"{k} {v}\n" for k, v in pairs)


def plan_clothing1m(args: Args) -> Plan:
    k = CLOTHING["classes"]
    sizes = {s: scaled(CLOTHING[s], args.scale, floor=k if s == "noisy_train" else 1)
             for s in ("noisy_train", "clean_train", "clean_val", "clean_test")}
    plan = Plan(num_classes=k)
    true: dict[str, np.ndarray] = {}
    split_keys: dict[str, list[str]] = {}
    start = 0
    for split, n in sizes.items():
        y = np.repeat(np.arange(k), spread(n, k, rng_for(args, f"clothing/{split}")))
        true[split] = y[rng_for(args, f"clothing/order/{split}").permutation(n)]
        split_keys[split] = keys(start, n, args.seed)
        start += n
        plan.add(split_keys[split], true[split], image_sizes(n, args, split))
        plan.splits[split] = n
    noisy = noisy_labels(true["noisy_train"], k, rng_for(args, "clothing/noise"))
    clean = ("clean_train", "clean_val", "clean_test")
    clean_keys = [key for s in clean for key in split_keys[s]]
    clean_true = np.concatenate([true[s] for s in clean])
    n_overlap = min(scaled(CLOTHING["overlap"], args.scale), len(clean_keys))
    overlap = np.sort(rng_for(args, "clothing/overlap").choice(len(clean_keys), n_overlap, replace=False))
    overlap_noisy = noisy_labels(clean_true[overlap], k, rng_for(args, "clothing/overlap-noise"))
    noisy_kv = list(zip(split_keys["noisy_train"], noisy.tolist())) + \
        [(clean_keys[i], y) for i, y in zip(overlap.tolist(), overlap_noisy.tolist())]
    clean_kv = list(zip(clean_keys, clean_true.tolist()))
    order = rng_for(args, "clothing/kv-order")
    plan.texts["noisy_label_kv.txt"] = _lines(noisy_kv[i] for i in order.permutation(len(noisy_kv)))
    plan.texts["clean_label_kv.txt"] = _lines(clean_kv[i] for i in order.permutation(len(clean_kv)))
    plan.texts["noisy_train_key_list.txt"] = "".join(f"{key}\n" for key in split_keys["noisy_train"])
    for s in clean:
        plan.texts[f"{s}_key_list.txt"] = "".join(f"{key}\n" for key in split_keys[s])
    plan.texts["category_names_eng.txt"] = "".join(f"{n}\n" for n in NAMES)
    plan.train_counts = [int(v) for v in np.bincount(noisy, minlength=k)]
    plan.source = {"name": "clothing1m", "root": ".", "train": "noisy"}
    share = float((noisy != true["noisy_train"]).mean())
    plan.notes.append(f"noisy_label_kv.txt {len(noisy_kv):,} lines, clean_label_kv.txt {len(clean_kv):,} lines; "
                      f"{100 * share:.2f} % of the noisy train labels differ from the true class")
    return plan
