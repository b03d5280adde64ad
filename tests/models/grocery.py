"""Grocery Store Dataset retrieval, protocol B: catalog = train photos + iconic images, queries = val."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.images import load_image

N_ITEMS = 81  # the data set's fine classes


@dataclass(frozen=True, slots=True)
class Split:
    """Decoded images and their fine class ids."""

    images: list[np.ndarray]
    labels: np.ndarray


def _read_list(root: Path, name: str) -> list[tuple[Path, int]]:
    rows = []
    for line in (root / name).read_text().splitlines():
        if line.strip():
            path, fine, _coarse = (part.strip() for part in line.split(","))
            rows.append((root / path, int(fine)))
    return rows


def load_split(root: Path, name: str) -> Split:
    """Decode every photo of ``train.txt`` / ``val.txt``."""
    rows = _read_list(root, name)
    return Split([load_image(p) for p, _ in rows], np.array([c for _, c in rows], dtype=np.int64))


def load_iconic(root: Path) -> Split:
    """The 81 iconic product images with their fine ids."""
    images, labels = [], []
    with open(root / "classes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            images.append(load_image(root / row["Iconic Image Path (str)"].lstrip("/")))
            labels.append(int(row["Class ID (int)"]))
    return Split(images, np.array(labels, dtype=np.int64))


def recall_at_1(
    queries: np.ndarray, q_labels: np.ndarray, catalog: np.ndarray, c_labels: np.ndarray
) -> float:
    """Brute-force cosine on unit rows: the fraction of queries whose nearest item has their class."""
    nearest = np.argmax(queries @ catalog.T, axis=1)
    return float(np.mean(c_labels[nearest] == q_labels))
