"""Readers of large image datasets' real on-disk formats, each turning a dataset root into a `FileListing`
(`rwray.data.listing`): files and labels per split, every problem reported at once with its file and line, no
image opened (the shard writer decodes them in parallel later).

One module per format; `FILE_SOURCES` lists them as (name, Params class, builder, doc) for a registry to add —
nothing is registered here, so importing this package has no side effects.
"""

from __future__ import annotations

from rwray.data.imagesources.clothing import Clothing1MParams, build_clothing1m
from rwray.data.imagesources.folder import ImageFolderParams, build_image_folder
from rwray.data.imagesources.imagenet9 import ImageNet9Params, build_imagenet9
from rwray.data.imagesources.inat import INat2018Params, build_inat2018
from rwray.data.imagesources.iwildcam import IWildCamParams, build_iwildcam
from rwray.data.imagesources.lists import (ImageListParams, ImageNetLTParams, PlacesLTParams, build_image_list,
                                           build_imagenet_lt, build_places_lt)

FILE_SOURCES = [
    ("image_folder", ImageFolderParams, build_image_folder,
     "root/{train,val,test}/<class>/<images>: one folder per class and split"),
    ("image_list", ImageListParams, build_image_list,
     "three `relpath label` list files, images relative to root"),
    ("imagenet_lt", ImageNetLTParams, build_imagenet_lt,
     "ImageNet-LT: OLTR's ImageNet_LT_{train,val,test}.txt over an ImageNet folder (1000 classes)"),
    ("places_lt", PlacesLTParams, build_places_lt,
     "Places-LT: OLTR's Places_LT_{train,val,test}.txt over a Places-365 folder (365 classes)"),
    ("inat2018", INat2018Params, build_inat2018,
     "iNaturalist 2018: train2018.json / val2018.json (test = official val; val carved from train)"),
    ("clothing1m", Clothing1MParams, build_clothing1m,
     "Clothing1M: noisy / clean label kv files and key lists (14 classes; column clean_label)"),
    ("imagenet9", ImageNet9Params, build_imagenet9,
     "ReBias's 9-class ImageNet (42 wnids), optional ImageNet-A split and texture-cluster columns"),
    ("iwildcam", IWildCamParams, build_iwildcam,
     "iWildCam (WILDS v2.0): metadata.csv, images in train/; splits + id_val / id_test; column location"),
]

__all__ = ["FILE_SOURCES"]
