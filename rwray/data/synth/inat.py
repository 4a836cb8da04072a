"""iNaturalist 2018 as distributed (visipedia/inat_comp ``2018/README.md``): ``train2018.json`` / ``val2018.json`` in
COCO style with the README's keys (info; images {id, width, height, file_name, license, rights_holder}; categories
{id, name, supercategory, kingdom, phylum, class, order, family, genus}; annotations {id, image_id, category_id};
licenses), images under ``train_val2018/<supercategory>/<category id>/<32 hex>.jpg``.

Shape (the README's table): 8,142 species, 437,513 train images (per class 1,000 ... 2: the figures the long-tail
papers quote), 24,426 val images (3 per class). Category ids belong to the 14 supercategories in the real id order:
the runs below are read off the published val list (facebookresearch/classifier-balancing
``data/iNaturalist18/iNaturalist18_val.txt``), e.g. Arachnida = ids 7..120, Plantae = 5221..8137. Category names and
the taxonomy fields are synthetic (the 2018 release obfuscated them too). Annotation id = image id (the list
generator of classifier-balancing asserts it); image ids run on from train into val, so they are unique across both.
"""

from __future__ import annotations

import json

import numpy as np

from rwray.data.synth.plan import Args, Plan, hex_names, image_sizes, permuted_counts, rng_for
from rwray.data.synth.profile import scaled, spread, train_profile

INAT = dict(classes=8142, train=437_513, train_max=1000, train_min=2, val=24_426)
# (supercategory, number of consecutive category ids), in id order; sums to 8,142.
RUNS = [("Animalia", 7), ("Arachnida", 114), ("Animalia", 21), ("Insecta", 2031), ("Animalia", 56),
        ("Actinopterygii", 369), ("Amphibia", 144), ("Animalia", 4), ("Aves", 1258), ("Animalia", 26),
        ("Mammalia", 234), ("Reptilia", 284), ("Animalia", 62), ("Mollusca", 262), ("Animalia", 2), ("Bacteria", 1),
        ("Chromista", 25), ("Fungi", 321), ("Plantae", 2917), ("Protozoa", 4)]
KINGDOM = {"Plantae": "Plantae", "Fungi": "Fungi", "Chromista": "Chromista", "Protozoa": "Protozoa",
           "Bacteria": "Bacteria"}  # every other supercategory is an animal group
VAL_MIN_TRAIN = 20  # the reader's default (and jobs/large/absgd_inat2018.yaml's): classes with >= 20 give 1 val image


def supercategories(k: int) -> list[str]:
    """[K] supercategory of each category id: the real runs, stretched over K ids when K != 8,142."""
    flat = np.repeat(np.arange(len(RUNS)), [n for _, n in RUNS])
    pick = np.minimum((np.arange(k) * flat.size) // k, flat.size - 1)
    return [RUNS[i][0] for i in flat[pick]]


def plan_inat2018(args: Args) -> Plan:
    k = args.classes or INAT["classes"]
    sorted_counts = train_profile(INAT["classes"], INAT["train"], INAT["train_max"], INAT["train_min"], args.scale,
                                  args.classes)
    counts = {"train": permuted_counts(sorted_counts, rng_for(args, "inat/labels")),
              "val": spread(scaled(INAT["val"], args.scale), k, rng_for(args, "inat/val"))}
    supers = supercategories(k)
    plan = Plan(num_classes=k, train_counts=[int(v) for v in counts["train"]])
    n_all = int(counts["train"].sum() + counts["val"].sum())
    names = iter(hex_names(n_all, args.seed, "inat2018"))
    next_id = 0
    categories = [{"id": c, "name": f"species_{c:04d}", "supercategory": s, "kingdom": KINGDOM.get(s, "Animalia"),
                   "phylum": f"phylum_{s.lower()}", "class": s, "order": f"order_{c // 64:03d}",
                   "family": f"family_{c // 16:04d}", "genus": f"genus_{c // 4:04d}"} for c, s in enumerate(supers)]
    for split, fname in (("train", "train2018.json"), ("val", "val2018.json")):
        labels = np.repeat(np.arange(k, dtype=np.int64), counts[split])
        labels = labels[rng_for(args, f"inat/order/{split}").permutation(labels.size)]  # files list species mixed
        rels = [f"train_val2018/{supers[c]}/{c}/{next(names)}.jpg" for c in labels.tolist()]
        sizes = image_sizes(len(rels), args, split)
        ids = range(next_id, next_id + len(rels))
        next_id += len(rels)
        images = [{"id": i, "width": int(w), "height": int(h), "file_name": rel, "license": 1,
                   "rights_holder": "rwray synthetic"} for i, rel, (w, h) in zip(ids, rels, sizes.tolist())]
        annotations = [{"id": i, "image_id": i, "category_id": c} for i, c in zip(ids, labels.tolist())]
        doc = {"info": {"year": 2018, "version": "1.0", "description": "iNaturalist 2018 shape, synthetic images "
                        "(rwray data synth)", "contributor": "rwray", "url": "", "date_created": "2018-02-01"},
               "images": images, "categories": categories, "annotations": annotations,
               "licenses": [{"id": 1, "name": "synthetic", "url": ""}]}
        plan.texts[fname] = json.dumps(doc)
        plan.add(rels, labels, sizes)
        plan.splits[split] = len(rels)
    top = int(sorted_counts[0])
    # The reader carves val from classes with >= val_min_train train images (20 at full size: a class keeps 19 or
    # more). At a smaller scale the bar scales with the counts, down to 2 (a class keeps one), so the carve covers
    # about the same classes and val is never empty while any class has 2.
    val_min = VAL_MIN_TRAIN if args.scale >= 1 else max(2, min(VAL_MIN_TRAIN, scaled(VAL_MIN_TRAIN, args.scale)))
    plan.source = {"name": "inat2018", "root": ".", "val_per_class": 1, "val_min_train": val_min, "seed": args.seed}
    if val_min != VAL_MIN_TRAIN:
        plan.notes.append(f"the val carve's bar scaled with the counts: val_min_train={val_min} (20 at full size)"
                          + (" (every class has one image: the carved val split is empty)" if top < 2 else ""))
    return plan
