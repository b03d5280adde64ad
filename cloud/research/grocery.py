"""The Grocery Store Dataset as a StoreLens catalog and query set (demo, eval, tests).

sku = the fine class name; title = class name plus coarse class; price and aisle are fake but
deterministic (derived from a hash of the sku) so builds are reproducible.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cloud.catalog import write_catalog


@dataclass(frozen=True, slots=True)
class GroceryClass:
    id: int
    name: str
    coarse: str
    iconic: str  # path relative to the data set root


def read_classes(root: Path) -> list[GroceryClass]:
    """classes.csv rows (its paths start with '/', meaning relative to the data set root)."""
    out = []
    with open(Path(root) / "classes.csv", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            out.append(GroceryClass(int(row[1]), row[0], row[2], row[4].lstrip("/")))
    return out


def _split(root: Path, split: str) -> list[tuple[str, int]]:
    rows = []
    for line in (Path(root) / f"{split}.txt").read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0]:
            rows.append((parts[0], int(parts[1])))
    return rows


def _fake_price(sku: str) -> str:
    cents = 49 + int(hashlib.sha256(sku.encode()).hexdigest()[:6], 16) % 900
    return f"{cents / 100:.2f}"


def write_grocery_catalog(
    root: Path, out: Path, *, iconic: bool = True, train: bool = True, per_class: int | None = None
) -> int:
    """Write a JSON Lines catalog of the data set's classes; return the number of images listed."""
    root = Path(root).resolve()
    images: dict[int, list[str]] = {}
    classes = read_classes(root)
    if iconic:
        for c in classes:
            images.setdefault(c.id, []).append(str(root / c.iconic))
    if train:
        for path, cid in _split(root, "train"):
            images.setdefault(cid, []).append(str(root / path))
    rows = []
    for c in classes:
        imgs = images.get(c.id, [])[: per_class or None]
        if not imgs:
            continue
        aisle = 1 + int(hashlib.sha256(c.coarse.encode()).hexdigest()[:4], 16) % 12
        rows.append(
            {
                "sku": c.name,
                "title": f"{c.name.replace('-', ' ')} ({c.coarse})",
                "price": _fake_price(c.name),
                "location": f"Aisle {aisle}, shelf {1 + c.id % 5}",
                "images": imgs,
            }
        )
    write_catalog(out, rows)
    return sum(len(r["images"]) for r in rows)


def write_grocery_queries(root: Path, out: Path, *, split: str = "val") -> int:
    """Write ``path,sku`` rows for a split's photos (absolute paths); return how many."""
    root = Path(root).resolve()
    names = {c.id: c.name for c in read_classes(root)}
    rows = [(str(root / p), names[cid]) for p, cid in _split(root, split)]
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "sku"])
        w.writerows(rows)
    return len(rows)
