"""The report's sections about the trained model: training curves and rollout error."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlake import fsio
from gradlake.report import figures
from gradlake.report.inputs import TrainingRun, column, rollout_provenance, rollout_tables, select, training_runs
from gradlake.report.plan import Plan


def add_training(plan: Plan, train_dir: str | None, storage_options) -> list[TrainingRun]:
    """The training curves of every run under ``train_dir`` (a note when there is none); returns the runs."""
    section = plan.section("training", "Training curves")
    if not train_dir:
        section.notes.append("No training directory was given (--train DIR), so there are no training curves.")
        return []
    fs, root = fsio.filesystem(train_dir, storage_options)
    runs = training_runs(train_dir, storage_options) if fs.exists(root) else []
    if not runs:
        section.notes.append(f"No complete checkpoint under {train_dir}, so there are no training curves.")
        return []
    series = {}
    for run in runs:
        prefix = "" if len(runs) == 1 else f"{run.name}: "
        epochs = np.array([m["epoch"] for m in run.history])
        series[prefix + "train"] = (epochs, np.array([m.get("train_smse", np.nan) for m in run.history], float))
        val_split = run.history[-1].get("val_split", "val") if run.history else "val"
        series[prefix + val_split] = (epochs, np.array([m.get("val_smse", np.nan) for m in run.history], float))
    tasks = sorted({run.task for run in runs if run.task})
    loss = f"The loss of task {', '.join(tasks)}" if tasks else "Scaled MSE"
    plan.figure(section, "training-curves",
                f"{loss} of one-step predictions per epoch, on the training split and on the held-out "
                "split; a widening gap between the lines means the model starts to memorise.",
                figures.training_curves, series=series, title=f"Training curves ({train_dir})")
    return runs


def add_rollout(plan: Plan, runs: list[TrainingRun], store_prov: dict[str, Any], storage_options) -> None:
    """Rollout error versus horizon of every rollout table next to a run's or the store's checkpoints."""
    section = plan.section("rollout", "Rollout error versus horizon")
    places = [p for run in runs for p in (*run.checkpoints, run.run_dir)]
    places += [info.get("path", "") for info in store_prov.get("checkpoints", {}).values()]
    places = list(dict.fromkeys(p for p in places if p))
    tables = rollout_tables(places, storage_options)
    if not tables:
        section.notes.append("No rollout table (rollout.parquet from `gradlake rollout`) next to any checkpoint, "
                             "so there is no rollout error.")
        return
    for path, table in tables.items():
        name = path.rstrip("/").rsplit("/", 1)[-1]
        split = rollout_provenance(path, storage_options).get("split", "?")
        curves = {}
        for cls in sorted(set(table.column("class").to_pylist()) - {"all"}) + ["all"]:
            part = select(table, **{"class": cls}).sort_by("horizon")
            if part.num_rows:
                mean, std = column(part, "smse_mean"), column(part, "smse_std")
                curves[cls] = (column(part, "horizon"), mean, mean - std, mean + std)
        plan.figure(section, f"rollout-{name}",
                    f"Checkpoint {name}, {split} split: scaled MSE of the model's own autoregressive "
                    "prediction at each horizon against the true state, mean over each class's trajectories "
                    "with a ±1 standard deviation band, so steeper growth means errors compound faster.",
                    figures.rollout_error, curves=curves, title=f"Rollout error, checkpoint {name} ({split})",
                    ylabel="scaled MSE vs ground truth")

