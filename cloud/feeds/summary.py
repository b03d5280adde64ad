"""The few lines a build or check ends with: rows, items and photos read, merged, skipped, and why.

Problems are grouped by reason (one line each, with a count and the first few rows or SKUs); the full
lists stay in the report file (``catalog build``) or ``catalog check --json``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cloud.catalog import Catalog

FIRST = 5  # rows or SKUs named per line


def catalog_fields(cat: Catalog) -> dict[str, Any]:
    """What reading the feed found, as report fields (JSON-ready)."""
    return {
        "format": cat.format,
        "rows": cat.rows,
        "items_read": len(cat.items),
        "merged_rows": cat.merged_rows,
        "images_listed": cat.images_listed,
        "images_repeated": cat.images_repeated,
        "bad_rows": [{"row": e.row, "sku": e.sku, "error": e.error} for e in cat.errors],
        "conflicts": {
            kind: [{"sku": c.sku, "kept": c.kept, "other": c.other} for c in found]
            for kind, found in cat.conflicts.items()
        },
    }


def reason(error: str) -> str:
    """An error's kind: its text up to the first quote, colon, slash or bracket, long numbers as N."""
    head = re.split(r"""[:'"/(]""", error, maxsplit=1)[0].strip() or error
    return re.sub(r"\b\d{4,}\b", "N", head)


def _grouped(errors: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in errors:
        groups.setdefault(reason(str(e["error"])), []).append(e)
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def _more(n: int) -> str:
    return f", ... {n - FIRST} more" if n > FIRST else ""


def summary_lines(rep: Mapping[str, Any], *, images_ok: int) -> list[str]:
    """A few lines: rows/items/photos read, merged, skipped, and why (grouped)."""
    bad_rows, bad_images = rep["bad_rows"], rep["bad_images"]
    lines = [
        f"read {rep['rows']} rows ({rep['format']}): {rep['items_read']} items, {rep['merged_rows']} rows "
        f"merged into repeated SKUs, {len(bad_rows)} rows skipped"
    ]
    for why, group in _grouped(bad_rows):
        rows = ", ".join(str(e["row"]) for e in group[:FIRST])
        lines.append(f"  skipped {len(group)} rows: {why} (rows {rows}{_more(len(group))})")
    for kind, found in rep["conflicts"].items():
        skus = ", ".join(c["sku"] for c in found[:FIRST])
        lines.append(f"  {len(found)} SKUs with two different {kind}s (the first row's kept): {skus}"
                     f"{_more(len(found))}")  # fmt: skip
    lines.append(
        f"photos: {rep['images_listed']} listed, {rep['images_repeated']} repeats of a photo dropped, "
        f"{images_ok} usable, {len(bad_images)} failed"
    )
    for why, group in _grouped(bad_images):
        e = group[0]
        lines.append(f"  {len(group)} photos failed: {why} (e.g. {e['sku']}: {e['source']}: {e['error']})")
    return lines
