"""iWildCam 2020 in the WILDS v2.0 layout (``iwildcam_v2.0/``): one ``metadata.csv`` (columns as read by WILDS's
``IWildCamDataset``: ``split``, ``filename``, ``y``, ``location_remapped``, plus ``category_id``, ``location``, ...),
every image under ``root/train/<filename>`` whatever its split. Splits: train, val (OOD), test (OOD), and WILDS's
in-distribution id_val / id_test when present. The int column ``location`` is the camera trap (the group)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from rwray.data.imagesources.common import FileIndex, need_dir, need_file
from rwray.data.listing import FileListing, FileSplit, raise_all
from rwray.registry import Params

SPLITS = ("train", "val", "test", "id_val", "id_test")


class IWildCamParams(Params):
    name: Literal["iwildcam"] = "iwildcam"
    root: Path = Field(description="the iwildcam_v2.0 folder: metadata.csv and train/")


def _sort_key(v: str):
    """Numeric ids sort as numbers (WILDS sorts the integer columns), anything else after them as text."""
    try:
        return (0, int(v), "")
    except ValueError:
        return (1, 0, v)


def build_iwildcam(p: IWildCamParams) -> FileListing:
    """Labels: ``y`` when present (WILDS's 0..C-1 labels), else ``category_id`` remapped by sorted unique id; classes
    are named by category id. index = the row's position in metadata.csv (WILDS's sample index)."""
    root = Path(os.path.abspath(p.root))
    problems: list[str] = []
    meta = root / "metadata.csv"
    if not (need_dir(root, "iWildCam root", problems) and need_file(meta, "metadata file", problems)):
        raise_all("iwildcam", problems)
    rows = []  # (line, split, filename, y or None, category_id or None, location, row position)
    with open(meta, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        loc_col = "location_remapped" if "location_remapped" in cols else "location"
        need = {"split", "filename", loc_col} | ({"y"} if "y" in cols else {"category_id"})
        if not need <= cols:
            raise_all(f"iwildcam at {root}", [f"metadata.csv:1: needs the columns {sorted(need)} (and y or "
                                              f"category_id), has {sorted(cols)}"])
        for pos, row in enumerate(reader):
            line = reader.line_num
            try:
                y = int(row["y"]) if "y" in cols else None
                cat = row["category_id"].strip() if "category_id" in cols else None
                loc = row[loc_col].strip()
                if not loc or cat == "" or not row["split"] or not row["filename"]:
                    raise ValueError
            except (ValueError, TypeError, AttributeError):
                problems.append(f"metadata.csv:{line}: a malformed row (split, filename, y / category_id, {loc_col}):"
                                f" {','.join(str(v) for v in row.values())[:100]!r}")
                continue
            if row["split"] not in SPLITS:
                problems.append(f"metadata.csv:{line}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
            if y is not None and y < 0:
                problems.append(f"metadata.csv:{line}: label y={y} is negative")
            rows.append((line, row["split"], row["filename"], y, cat, loc, pos))
    index, name_of = FileIndex(), {}
    for line, _, filename, y, cat, *_ in rows:
        if not index.exists(os.path.join(root, "train", filename)):
            problems.append(f"metadata.csv:{line}: file train/{filename} does not exist")
        if y is not None and cat is not None and name_of.setdefault(y, cat) != cat:
            problems.append(f"metadata.csv:{line}: y={y} is category {cat} here, {name_of[y]} on an earlier row")
    problems += [f"metadata.csv: no {s} rows" for s in ("train", "val", "test") if all(r[1] != s for r in rows)]
    if problems:
        raise_all(f"iwildcam at {root}", problems)
    if "y" in cols:
        k = 1 + max(r[3] for r in rows)
        classes = [name_of.get(c, str(c)) for c in range(k)]
        label = {r[6]: r[3] for r in rows}
    else:  # WILDS v1.0 style: remap the category ids by sorted unique value
        classes = sorted({r[4] for r in rows}, key=_sort_key)
        label_of = {c: i for i, c in enumerate(classes)}
        label = {r[6]: label_of[r[4]] for r in rows}
    locations = {v: i for i, v in enumerate(sorted({r[5] for r in rows}, key=_sort_key))}
    splits = {}
    for s in SPLITS:
        mine = [r for r in rows if r[1] == s]
        if mine:
            splits[s] = FileSplit([os.path.join(root, "train", r[2]) for r in mine], [label[r[6]] for r in mine],
                                  columns={"location": [locations[r[5]] for r in mine]}, index=[r[6] for r in mine])
    return FileListing(classes, splits)
