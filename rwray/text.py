"""Long lists in messages, kept short: the count and the first few items, never hundreds of names.

    plural(990, "class", "classes")            -> "990 classes"
    some(["n01440764", "n01443537", ...])      -> "n01440764, n01443537, n01484850, n01491361, n01494475, ...
                                                   and 985 more"

A message that names classes (a 1,000- or 8,142-class dataset), files or splits goes through `some`, so its length
stays bounded whatever the dataset's size; the count itself is always given in full.

A leaf: imports nothing from rwray.
"""

from __future__ import annotations

from typing import Iterable

SHOWN = 5  # items named before "... and N more"
# The items shown share LIST_CHARS characters (one item: all of them, five: 100 each); a longer item (a deep file
# path) is cut in the middle, since its start and its end are what identify it.
LIST_CHARS = 500
ITEM_CHARS = LIST_CHARS // SHOWN


def plural(n: int, word: str, words: str | None = None) -> str:
    """``n`` and the noun in the right number: "1 class", "990 classes" (``words`` defaults to word + "s")."""
    return f"{n} {word if n == 1 else (words if words is not None else word + 's')}"


def clip(item: object, width: int = ITEM_CHARS) -> str:
    """``str(item)``, cut in the middle to ``width`` characters when longer (the cut shown as "...")."""
    s = str(item)
    if len(s) <= width:
        return s
    head = (width - 3) // 2
    return f"{s[:head]}...{s[len(s) - (width - 3 - head):]}"


def some(items: Iterable[object], shown: int = SHOWN, sep: str = ", ") -> str:
    """The first ``shown`` items joined by ``sep``, then "... and N more" when there are more; the items shown are
    clipped to share LIST_CHARS (at least ITEM_CHARS each), so the result stays within about
    max(LIST_CHARS, shown * ITEM_CHARS) + shown * len(sep) + 30 characters, whatever the list."""
    items = list(items)
    width = max(ITEM_CHARS, LIST_CHARS // max(1, min(shown, len(items))))
    head = sep.join(clip(i, width) for i in items[:shown])
    rest = len(items) - shown
    return f"{head}{sep}... and {rest} more" if rest > 0 else head
