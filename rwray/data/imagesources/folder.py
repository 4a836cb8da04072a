"""One folder per class: ``root/{train,val,test}/<class>/<image files>`` (torchvision ImageFolder's layout, per
split). Classes are train's sorted sub-folder names; val and test may only use those."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from rwray.data.imagesources.common import IMAGE_EXTENSIONS, image_files, need_dir, subfolders
from rwray.data.listing import REQUIRED_SPLITS, FileListing, FileSplit, raise_all
from rwray.registry import Params


class ImageFolderParams(Params):
    name: Literal["image_folder"] = "image_folder"
    root: Path = Field(description="folder holding train/, val/ and test/, each with one sub-folder per class")


def build_image_folder(p: ImageFolderParams) -> FileListing:
    """Files sorted by name within each class folder (a stable order, hence stable index ids); only the extensions
    in IMAGE_EXTENSIONS count (case-insensitive); nested folders inside a class folder are not read."""
    root = Path(os.path.abspath(p.root))
    problems: list[str] = []
    present = [s for s in REQUIRED_SPLITS if need_dir(root / s, f"{s} folder", problems)]
    classes = subfolders(str(root / "train")) if "train" in present else []
    if "train" in present and not classes:
        problems.append(f"{root / 'train'}: holds no class folders")
    label_of = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in present:
        files, labels = [], []
        for cls in subfolders(str(root / split)):
            if cls not in label_of:  # a label train never saw: the model has no output for it
                problems.append(f"{split}/{cls}: class folder not in train/ (train's classes: "
                                f"{', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''})")
                continue
            names = image_files(str(root / split / cls))
            if not names and split == "train":
                problems.append(f"train/{cls}: holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += [str(root / split / cls / n) for n in names]
            labels += [label_of[cls]] * len(names)
        if not files and classes:
            problems.append(f"{split}: holds no image files")
        splits[split] = FileSplit(files, labels)
    if problems:
        raise_all(f"image_folder at {root}", problems)
    return FileListing(classes, splits)
