"""Successive halving inside each replicate's tuning: where a comparison spends its epochs.

Tuning in every replicate (``xmr.compare.runner``) trains every candidate of every variant
in every replicate; most of those epochs go to candidates that validation rejects. Successive
halving spends them where they decide: in each group of one (level, replicate, variant), all
of its candidates train to the first rung (``first_rung`` epochs), the best ``1/eta`` of them
by validation (rounded up) continue to the next rung (``first_rung * eta`` epochs), and so on;
once one candidate is left, or no rung is left below the cap, the survivors train to the cap
(or until ``optim.patience`` ends them), and the chosen run is the best on validation among
them, as without halving.

What keeps it a fair comparison:

- **Equal budgets.** Every variant of a claim in a replicate is offered the same candidates,
  the same rungs and the same cap, and keeps as many at each rung; a rung's decision is made
  inside one group, never across variants.
- **One schedule.** A candidate paused at a rung was scheduled for the full cap from its
  first epoch (the cosine decays over ``optim.epochs``, the cap); the next rung resumes it from
  its run folder (the newest checkpoint: weights, optimiser, scheduler, random state), so
  continuing it is more of the same run, never a new schedule or a retraining.
- **Rung scores are validation scores.** A candidate is ranked at a rung by its best
  validation score up to that rung (a paused run's ``best.json`` so far); test data are read by
  the chosen runs' scoring only.

The default ``eta = 3, first_rung = 5`` was chosen by a rule on validation data alone (no test
score enters it), from the per-epoch validation histories of every candidate of two
shipped specs run without halving at 2 replicates (cdaml_hierarchy, 8 groups of 4 candidates;
map_center_modality_gap, 12 groups of 3), replaying halving on them: it is the smallest first
rung of 1, 2, 3 and 5 whose pick matched the pick without halving in at least 90% of groups
(19 of 20; first_rung 1: 17, 2: 18, 3: 16 of 20), at 40% of the epochs (3: 32%). Every epoch
already ends with a validation pass, so a rung decision costs no extra evaluation. Measured
on cdaml_hierarchy (2 replicates, one round): 361 tuning epochs without halving, 170 with
(3, 5), 131 with (3, 3). ``halving: off`` trains every candidate to the cap.

Order at a level (``xmr.compare.runner``): a round halves first; then the chosen runs, which
reached the cap, decide whether the cap doubles (a new round of new runs, a cosine over the
new cap, halved again over the rungs below it) and whether a range widens (a new round too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_ETA = 3
DEFAULT_FIRST_RUNG = 5


@dataclass(frozen=True)
class Halving:
    """A spec's ``tuning.halving``: keep the best ``1/eta`` at every rung; the first rung at
    ``first_rung`` epochs, each next one ``eta`` times later."""

    eta: int = DEFAULT_ETA
    first_rung: int = DEFAULT_FIRST_RUNG

    def rungs(self, cap: int) -> list[int]:
        """The rungs (epochs) below ``cap``: ``first_rung * eta**k`` for k = 0, 1, ...; a rung at
        or past the cap is the cap itself, which every survivor reaches anyway."""
        out, rung = [], self.first_rung
        while rung < cap:
            out.append(rung)
            rung *= self.eta
        return out

    def keep(self, n: int) -> int:
        """How many of ``n`` candidates continue past a rung: ``n / eta`` rounded up, at least 1."""
        return max(1, math.ceil(n / self.eta))


def survivors(alive: list[str], scores: dict[str, float], keep: int, sign: float) -> list[str]:
    """The ``keep`` best of ``alive`` by validation score (``sign`` -1 where lower is better),
    ties to the earlier candidate (``alive`` is in candidate order, as ``winners`` breaks ties);
    a candidate without a score (it failed) never continues."""
    scored = [(i, run) for i, run in enumerate(alive) if not math.isnan(scores.get(run, math.nan))]
    ranked = sorted(scored, key=lambda item: (-sign * scores[item[1]], item[0]))
    kept = {run for _, run in ranked[:keep]}
    return [run for run in alive if run in kept]  # still in candidate order


def rung_id(run: str, rung: int) -> str:
    """A rung job's id: its run folder (shared with the candidate's later rungs and its final
    job, which resume it) and the rung."""
    return f"{run}@e{rung}"


def group_of(job: dict[str, Any]) -> tuple[str, int, str]:
    return str(job["level"]), int(job["seed"]), str(job["variant"])


def successive_halving(jobs: dict[str, dict[str, Any]], halving: Halving | None,
                       run: Callable[[dict[str, dict[str, Any]], int], dict[str, dict[str, Any]]],
                       sign: Callable[[dict[str, Any]], float]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Train ``jobs`` (every candidate's job at its cap, keyed by its run folder) with
    successive halving inside each (level, replicate, variant) group: ``run(stage_jobs,
    stage)`` trains one stage's jobs (rung jobs carry ``until``, the rung) and returns their
    results. Returns (every job that ran, by id; their results): a candidate dropped at a rung
    has rung jobs only, so the chosen run is picked among the survivors' final jobs. Without
    ``halving`` there is one stage, every candidate to the cap."""
    groups: dict[tuple, list[str]] = {}
    for job_id, job in sorted(jobs.items(), key=lambda item: (group_of(item[1]), item[1].get("candidate", 0))):
        groups.setdefault(group_of(job), []).append(job_id)
    state = {g: (alive, 0) for g, alive in groups.items()}  # group -> (candidates alive, next rung index)
    ran: dict[str, dict] = {}
    results: dict[str, dict] = {}
    stage = 0
    while state:
        todo, at = {}, {}
        for g, (alive, k) in state.items():
            rungs = halving.rungs(int(jobs[alive[0]]["config"]["optim"]["epochs"])) if halving else []
            if len(alive) > 1 and k < len(rungs):
                at[g] = rungs[k]
                todo.update({rung_id(r, rungs[k]): {**jobs[r], "until": rungs[k]} for r in alive})
            else:
                todo.update({r: jobs[r] for r in alive})
        out = run(todo, stage)
        ran.update(todo)
        results.update(out)
        for g in list(state):
            alive, k = state[g]
            if g not in at:  # its survivors reached the cap
                del state[g]
                continue
            scores = {r: float(out.get(rung_id(r, at[g]), {}).get("val_score", math.nan)) for r in alive}
            kept = survivors(alive, scores, halving.keep(len(alive)), sign(jobs[alive[0]]))
            if kept:
                state[g] = (kept, k + 1)
            else:  # every candidate failed
                del state[g]
        stage += 1
    return ran, results
