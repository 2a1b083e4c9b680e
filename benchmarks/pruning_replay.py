"""Which pruner, with which settings: replay full-budget searches' learning curves through
Optuna's pruners and count what each would have saved and lost.

    python benchmarks/search_pruning.py --data-dir DIR --modes base --keep JOURNALS
    python benchmarks/pruning_replay.py JOURNALS/base-*.log

A lone worker's search with a pruner trains the same trials, in the same order, to the
same values up to where each is stopped (the sampler's draws do not depend on the
trials' states, and a training does not depend on what is reported): so feeding each
kept trial's recorded curve, in trial order, to a fresh study with the pruner gives
exactly the trials that pruner would have stopped, and where. Per setting it prints the
fraction of the full search's training steps it would train, and how far below the
full search's best validation accuracy its best COMPLETE trial would be (mean and worst
over the journals). Wall time follows the steps closely (a pruned trial also skips its
final evaluations); ``search_pruning.py`` measures it for the chosen setting.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from klayer.search.pruning import PrunerSettings, make_pruner  # noqa: E402


def curves(journal: Path) -> tuple[str, list[FrozenTrial]]:
    """The journal's one study's name, and its COMPLETE trials in trial order."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return summary.study_name, [t for t in study.get_trials(deepcopy=False)
                                if t.state == TrialState.COMPLETE]


def replay(name: str, trials: list[FrozenTrial], settings: PrunerSettings
           ) -> tuple[float, float]:
    """(fraction of the training steps trained, full best - pruned best in points). The
    study keeps its name: Hyperband assigns a trial's bracket by study name and number."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, direction="maximize",
                                pruner=make_pruner(settings))
    full = sum(t.user_attrs["steps"] for t in trials)
    trained, best = 0, 0.0
    for t in trials:
        trial = study.ask()
        total, stopped = t.user_attrs["steps"], None
        for step, value in sorted(t.intermediate_values.items()):
            trial.report(value, step)
            if step < total and trial.should_prune():
                stopped = step
                break
        if stopped is None:
            study.tell(trial, t.value)
            trained += total
            best = max(best, t.value or 0.0)
        else:
            study.tell(trial, state=TrialState.PRUNED)
            trained += stopped
    return trained / full, 100 * (max(t.value or 0.0 for t in trials) - best)


def settings_grid(total: int) -> list[PrunerSettings]:
    out = [PrunerSettings("none", max_resource=total)]
    for kind, rf, frac in itertools.product(("sha", "hyperband"), (2, 3, 4),
                                           (1 / 16, 1 / 9, 1 / 6, 1 / 4, 1 / 3, 1 / 2)):
        out.append(PrunerSettings(kind, int(total * frac), rf, total))
    for frac in (1 / 9, 1 / 4, 1 / 3, 1 / 2):
        out.append(PrunerSettings("median", int(total * frac), 3, total))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("journals", nargs="+", help="journals of full-budget (unpruned) searches")
    args = p.parse_args()
    searches = [curves(Path(j)) for j in args.journals]
    total = searches[0][1][0].user_attrs["steps"]
    rows = []
    for s in settings_grid(total):
        got = [replay(name, trials, s) for name, trials in searches]
        rows.append((statistics.mean(f for f, _ in got), statistics.mean(g for _, g in got),
                     max(g for _, g in got), s))
    print(f"{len(searches)} searches of {[len(t) for _, t in searches]} trials, {total} "
          "steps each")
    print("steps trained  best gap (mean, worst)  pruner")
    for frac, gap, worst, s in sorted(rows, key=lambda r: (r[0], r[1])):
        print(f"{frac:12.3f}  {gap:+6.2f} {worst:+6.2f} points       {s.describe()}")


if __name__ == "__main__":
    main()
