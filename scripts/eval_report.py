"""`make eval`'s report: the table it prints and the accuracy / "no match" plot (scripts/eval_grocery.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud.open_set import OPEN_SET_KNOWN_LOSS
from scripts.eval_data import OPEN_SET_SEED, OPEN_SET_SHARE, OUT


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, proto in zip(axes, ("A", "B"), strict=True):
        for name, style in (("baseline", "--"), (results["best"], "-")):
            o = results["protocols"][proto][name]["open_set"]
            c = o["curve"]
            ax.plot(c["threshold"], c["known_r1"], style, color="tab:blue", label=f"{name}: in-catalog R@1")
            ax.plot(c["threshold"], c["unseen_no_match"], style, color="tab:red",
                    label=f"{name}: unseen no match")  # fmt: skip
            ax.axvline(o["threshold"], linestyle=style, color="gray")
        ax.set_title(f"protocol {proto}: open set ({round(OPEN_SET_SHARE * 100)}% of items left out)")
        ax.set_xlabel("similarity threshold (vertical lines: calibrated from the catalog)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict[str, Any], methods: list[Any]) -> None:
    head = (f"{'method (cumulative)':32} {'A R@1':>6} {'A R@5':>6} {'A noM':>6} {'A in@t':>12} "
            f"{'A rule':>6} {'B R@1':>6} {'B R@5':>6} {'B noM':>6} {'B in@t':>12} "
            f"{'B ruleNoM':>9} {'B rule in@t':>11} {'cost':>5}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for m in methods:
        if m.proxy and not methods[methods.index(m) - 1].proxy:
            print("kiosk multi-frame proxy (not single-image results):")
        if m.per_item > 1 and methods[methods.index(m) - 1].per_item == 1:
            print(f"class-level scoring: an item scores the mean of its {m.per_item} best images, not its "
                  "best one (no open-set rule for these):")
        if m.tuned and not methods[methods.index(m) - 1].tuned:
            print("bundle tuned on each protocol's own catalog (models.tune; open-set columns: tuned "
                  "without the unseen items):")
        cells = [f"{m.name:32}"]
        if m.per_item > 1:
            a, b = results["protocols"]["A"][m.name], results["protocols"]["B"][m.name]
            print(f"{m.name:32} {a['r1']:6.3f} {a['r5']:6.3f} {'':25} {b['r1']:6.3f} {b['r5']:6.3f}")
            continue
        for proto in ("A", "B"):
            r = results["protocols"][proto][m.name]
            o = r["open_set"]
            cells.append(f"{r['r1']:6.3f} {r['r5']:6.3f} {o['no_match_unseen']:6.3f} "
                         f"{o['known_r1_at_threshold']:.3f}/{o['known_r1_free']:.3f}")  # fmt: skip
            if proto == "A":  # one image per item: no rule can be calibrated, the kiosk always answers
                cells.append(f"{'none' if o['rule']['kind'] == 'none' else 'yes':>6}")
        rb = results["protocols"]["B"][m.name]["open_set"]["rule"]
        cells.append(f"{rb['no_match_unseen']:9.3f} {rb['known_r1_at_threshold']:11.3f}")
        cells.append(f"{results['relative_kiosk_cost'][m.name]:5.3f}")
        print(" ".join(cells))
    t = results["timing_ms"]
    print(
        f"\nnoM: share of unseen-item queries answered 'no match' at the catalog-calibrated threshold "
        f"({round(OPEN_SET_SHARE * 100)}% of items left out, seed {OPEN_SET_SEED}); in@t: in-catalog R@1 at "
        f"that threshold / threshold-free. rule: the same for cloud.open_set.calibrate_open_set/is_match "
        f"(top-1 + margin, calibrated with near-duplicate-aware hold-outs, giving up "
        f"{OPEN_SET_KNOWN_LOSS:.0%} of simulated right answers as the build does; A's one image per item "
        f"gives none: the kiosk always answers). '(as built)': what `catalog build` ships. cost: per-query "
        f"kiosk time relative to baseline (embed "
        f"{t['embed_ms']:.2f} ms, search {t['search_base_ms']:.3f} -> {t['search_adapter_ms']:.3f} ms)."
    )
    print("R@k is item-level (distinct items).")


def print_written(results: dict[str, Any]) -> None:
    print(f"\nWrote {OUT / 'grocery.json'} and {OUT / 'grocery.png'} in {results['total_s']:.0f} s "
          f"({results['embedded_now']} images embedded now).")
