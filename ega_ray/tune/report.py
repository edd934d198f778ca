"""What a search writes: trials.csv, best.yaml, plots, and the best trial printed as a table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from ega_ray.config import Config  # noqa: E402
from ega_ray.disk import write_atomic, write_with  # noqa: E402
from ega_ray.driver.tracking import write_rows  # noqa: E402
from ega_ray.errors import DivergedError, find_usage_error  # noqa: E402
from ega_ray.tune.experiment import trial_storage  # noqa: E402
from ega_ray.tune.space import NONE_SUFFIX, apply_params, effective_params  # noqa: E402
from ega_ray.worker.common import latest_state  # noqa: E402

DIVERGED = "DIVERGED"  # trials.csv's status of a trial stopped by a non-finite loss


def _column(key: str, keys: list[str]) -> str:
    """Columns are named after the searched field (``temperature``), dotted only if two searched paths end in it."""
    leaf = key.rsplit(".", 1)[1]
    return leaf if sum(k.rsplit(".", 1)[1] == leaf for k in keys) == 1 else key


def trial_history(storage: str, trial_id: str, reported: pd.DataFrame | None) -> pd.DataFrame | None:
    """A trial's epochs: from its latest Ray Train checkpoint when it has one (complete across restarts of
    an interrupted search), else what Tune received."""
    state = latest_state(storage, trial_id)
    return pd.DataFrame(state["history"]) if state is not None else reported


def trial_rows(results, cfg: Config, output: Path) -> list[dict[str, Any]]:
    keys = list(cfg.tune.space)
    rows = []
    for r in results:
        config = r.config or {}  # None for a trial that failed before its first report
        params = effective_params({k: v for k, v in config.items() if k in keys or k.endswith(NONE_SUFFIX)})
        trial_id = (r.metrics or {}).get("trial_id") or "_".join(Path(r.path).name.split("_")[2:4])
        history = trial_history(trial_storage(cfg.run.storage, output), trial_id, r.metrics_dataframe)
        epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
        diverged = find_usage_error(r.error) if r.error is not None else None
        if isinstance(diverged, DivergedError):
            status = DIVERGED  # a non-finite loss: its epochs before are shown, it is never the best
        elif r.error is not None:
            status = "ERROR"
        elif epochs >= cfg.optim.epochs:
            status = "COMPLETED"
        else:
            status = "STOPPED"  # by ASHA, or an unfinished trial of an interrupted search
        row = {"trial_id": trial_id, "status": status}
        for key in keys:
            row[_column(key, keys)] = params.get(key)
        scored = epochs and status != DIVERGED  # a diverged trial's earlier epochs are not its score
        row |= trial_scores(history if scored else None) | {"epochs": epochs}
        rows.append((row, params, history))
    return rows


SCORE_COLUMNS = ("selected_epoch", "validation_top1_at_selected", "test_top1_at_selected", "test_top1_last")


def trial_scores(history: pd.DataFrame | None) -> dict[str, Any]:
    """A trial's trials.csv scores, each named after its split: the epoch the validation split selected (the
    first with the best validation top-1), that validation top-1, and the test top-1 there and at the trial's
    last epoch (NaN for a trial without an epoch). Trials are compared on the validation score only."""
    if history is None:
        return dict.fromkeys(SCORE_COLUMNS, math.nan)
    at = int(history["validation_top1"].to_numpy().argmax())
    return {
        "selected_epoch": int(history["epoch"].iloc[at]),
        "validation_top1_at_selected": float(history["validation_top1"].iloc[at]),
        "test_top1_at_selected": float(history["test_top1"].iloc[at]),
        "test_top1_last": float(history["test_top1"].iloc[-1]),
    }


def best_trial(rows: list[tuple[dict[str, Any], dict[str, Any], Any]]):
    """The row with the highest validation top-1 (at its selected epoch) among the trials that trained an
    epoch and did not diverge; None if none did."""
    usable = [r for r in rows if r[0]["epochs"] > 0 and r[0]["status"] != DIVERGED]
    return max(usable, key=lambda r: r[0]["validation_top1_at_selected"]) if usable else None


def write_report(results, cfg: Config, output: Path, wall_time_s: float) -> dict[str, Any]:
    rows = trial_rows(results, cfg, output)
    if not rows:
        raise RuntimeError("the search produced no trials")
    write_rows(output / "trials.csv", [r[0] for r in rows])
    plot_search(rows, cfg, output / "search.png")
    found = best_trial(rows)
    if found is None:
        raise RuntimeError(f"the search's {len(rows)} trials all diverged or ended before an epoch: see trials.csv")
    best_row, best_params, _ = found
    best = apply_params(cfg.model_dump(mode="json"), best_params)
    best["run"] |= {"name": "best", "output": None, "fail_after_epoch": None}
    write_atomic(
        output / "best.yaml",
        f"# ega-ray tune: the best of {len(rows)} trials by validation top-1 "
        f"({best_row['validation_top1_at_selected']:.2f}; test top-1 there {best_row['test_top1_at_selected']:.2f}); "
        f"run with: ega-ray distill --config best.yaml\n" + yaml.safe_dump(best, sort_keys=False)
    )
    print_best(best_row, len(rows), wall_time_s)
    return best_row | {"trials": len(rows), "wall_time_s": round(wall_time_s, 1)}


def plot_search(rows, cfg: Config, path: Path) -> None:
    """Three panels: top-1 against temperature (hard graph apart), node vs edge weight coloured by top-1,
    learning curves of the best trials. Diverged trials are black crosses where their values lie (at the
    bottom of the first panel: they have no score)."""
    done = [r for r in rows if r[0]["epochs"] > 0 and r[0]["status"] != DIVERGED]
    diverged = [r[1] for r in rows if r[0]["status"] == DIVERGED]
    fig, (ax_t, ax_w, ax_c) = plt.subplots(1, 3, figsize=(15, 4.2))
    soft = [
        (r[1].get("distill.ega.temperature"), r[0]["validation_top1_at_selected"])
        for r in done
        if r[1].get("distill.ega.temperature") is not None
    ]
    hard = [
        r[0]["validation_top1_at_selected"]
        for r in done
        if "distill.ega.temperature" in r[1] and r[1]["distill.ega.temperature"] is None
    ]
    if soft:
        ax_t.scatter(*zip(*soft, strict=True), label="soft graph (τ)")
        ax_t.set_xscale("log")
        ax_t.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
    if hard:
        x = min((t for t, _ in soft), default=1.0) / 2
        ax_t.scatter([x] * len(hard), hard, marker="s", color="C3", label="hard graph (paper)")
    ax_t.set(xlabel="graph temperature τ", ylabel="best validation top-1 (%)", title="top-1 against temperature")
    tau = "distill.ega.temperature"
    lost = [params[tau] for params in diverged if params.get(tau) is not None]
    if lost:
        y = min((top1 for _, top1 in soft), default=0.0) if soft else 0.0
        ax_t.scatter(lost, [y] * len(lost), marker="x", color="black", label=f"diverged ({len(diverged)})")
    if soft or hard or lost:
        ax_t.legend()
    pts = [
        (r[1]["distill.ega.node_weight"], r[1]["distill.ega.edge_weight"], r[0]["validation_top1_at_selected"])
        for r in done
        if "distill.ega.node_weight" in r[1] and "distill.ega.edge_weight" in r[1]
    ]
    if pts:
        xs, ys, cs = zip(*pts, strict=True)
        sc = ax_w.scatter(xs, ys, c=cs, cmap="viridis", s=60)
        fig.colorbar(sc, ax=ax_w, label="best validation top-1 (%)")
    lost_w = [(q["distill.ega.node_weight"], q["distill.ega.edge_weight"]) for q in diverged
              if "distill.ega.node_weight" in q and "distill.ega.edge_weight" in q]  # fmt: skip
    if lost_w:
        ax_w.scatter(*zip(*lost_w, strict=True), marker="x", color="black", s=60, label="diverged")
        ax_w.legend()
    ax_w.set(xlabel="node weight", ylabel="edge weight", title="loss weights")
    for row, _, history in sorted(done, key=lambda r: -r[0]["validation_top1_at_selected"])[:5]:
        label = f"{row['trial_id']} ({row['validation_top1_at_selected']:.1f})"
        ax_c.plot(history["epoch"], history["validation_top1"], label=label)
    ax_c.set(xlabel="epoch", ylabel="validation top-1 (%)", title="best trials")
    if done:
        ax_c.legend(fontsize=8)
    if diverged:  # whatever the space: the count is on the figure
        names = ", ".join(r[0]["trial_id"] for r in rows if r[0]["status"] == DIVERGED)
        fig.suptitle(f"{len(diverged)} of {len(rows)} trials diverged (a non-finite loss): {names}", fontsize=9)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def print_best(row: dict[str, Any], trials: int, wall_time_s: float) -> None:
    print(f"\nbest of {trials} trials ({wall_time_s:.0f} s):")
    width = max(len(k) for k in row)
    for k, v in row.items():
        shown = f"{v:.4g}" if isinstance(v, float) else str(v)
        print(f"  {k:<{width}}  {shown}")
