"""The table of synthetic datasets: name -> published shape and planner (`SynthSpec`)."""

from __future__ import annotations

from rwray.data.synth.clothing import CLOTHING, plan_clothing1m
from rwray.data.synth.imagenet9 import IMAGENET9, plan_imagenet9
from rwray.data.synth.inat import INAT, plan_inat2018
from rwray.data.synth.iwildcam import IWILDCAM, plan_iwildcam
from rwray.data.synth.oltr import IMAGENET_LT, PLACES_LT, plan_imagenet_lt, plan_places_lt
from rwray.data.synth.plan import SynthSpec


def _oltr(name: str, title: str, shape: dict, plan, sources: str) -> SynthSpec:
    return SynthSpec(name, title, shape["classes"], {s: shape[s] for s in ("train", "val", "test")},
                     shape["train_max"], shape["train_min"], sources, plan)


SYNTHS: dict[str, SynthSpec] = {
    "imagenet_lt": _oltr("imagenet_lt", "ImageNet-LT (OLTR lists over an ImageNet folder)", IMAGENET_LT,
                         plan_imagenet_lt, "Liu et al. 2019 (OLTR); facebookresearch/classifier-balancing "
                         "data/ImageNet_LT/ (path style)"),
    "places_lt": _oltr("places_lt", "Places-LT (OLTR lists over a Places-365 folder)", PLACES_LT, plan_places_lt,
                       "Liu et al. 2019 (OLTR); facebookresearch/classifier-balancing data/Places_LT/ (counted)"),
    "inat2018": SynthSpec("inat2018", "iNaturalist 2018 (COCO-style JSON)", INAT["classes"],
                          {"train": INAT["train"], "val": INAT["val"]}, INAT["train_max"], INAT["train_min"],
                          "visipedia/inat_comp 2018/README.md; classifier-balancing data/iNaturalist18/ (id order)",
                          plan_inat2018),
    "clothing1m": SynthSpec("clothing1m", "Clothing1M (label kv files and key lists)", CLOTHING["classes"],
                            {s: CLOTHING[s] for s in ("noisy_train", "clean_train", "clean_val", "clean_test")},
                            None, None, "Xiao et al. 2015 (CVPR); the dataset README", plan_clothing1m, reclass=False),
    "iwildcam": SynthSpec("iwildcam", "iWildCam (WILDS v2.0 metadata.csv)", IWILDCAM["classes"],
                          {s: IWILDCAM[s] for s in ("train", "val", "test", "id_val", "id_test")},
                          IWILDCAM["train_max"], IWILDCAM["train_min"],
                          "Koh et al. 2021 (WILDS); p-lambda/wilds dataset_preprocessing/iwildcam/create_split.py",
                          plan_iwildcam),
    "imagenet9": SynthSpec("imagenet9", "ReBias's 9-class ImageNet (+ ImageNet-A, texture clusters)",
                           IMAGENET9["classes"], {"train": 42 * IMAGENET9["train_per_wnid"],
                                                  "val": 42 * IMAGENET9["val_per_wnid"]},
                           None, None, "clovaai/rebias datasets/imagenet.py; hendrycks/natural-adv-examples",
                           plan_imagenet9, reclass=False),
}
