"""How many trials a search needed to reach a good result, from its Optuna journal.

    .venv/bin/python bench/trials_to_target.py JOURNAL [JOURNAL ...] [--max-share 0.1] [--max-kl 0.05]

JOURNAL: an apostate run folder's study.journal, or a Heretic checkpoint .jsonl (its keys are
read as bench/heretic_side_by_side.py reads them). Prints, per journal: the number of the first
trial (counted from 1, in the order trials started) with refusals <= max-share of the prompts at
KL <= max-kl, the minutes from the first trial's start to that trial's end, and the best such
trial of the whole search. A trial that stopped counting once beaten (`dominated`) has partial
counts and is never the target.
"""

from __future__ import annotations

import argparse
from pathlib import Path

KEYS = (("kl", "total"), ("kl_divergence", "n_bad_prompts"))  # apostate's, Heretic's


def first_on_target(journal: Path, max_share: float, max_kl: float) -> str:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=JournalStorage(JournalFileBackend(str(journal))))
    done = sorted((t for t in study.trials if t.datetime_complete), key=lambda t: t.datetime_start)
    if not done:
        return "no finished trial"
    kl_key, total_key = next((keys for keys in KEYS if any(keys[0] in t.user_attrs for t in done)), KEYS[0])
    first_start = done[0].datetime_start
    hits = []
    for position, trial in enumerate(done, start=1):
        attrs = trial.user_attrs
        if "refusals" not in attrs or kl_key not in attrs or "dominated" in attrs:
            continue
        total = attrs.get(total_key) or attrs.get("total")
        if total and attrs["refusals"] <= max_share * total and attrs[kl_key] <= max_kl:
            minutes = (trial.datetime_complete - first_start).total_seconds() / 60
            hits.append((position, minutes, attrs["refusals"], total, attrs[kl_key]))
    if not hits:
        return f"not reached in {len(done)} trials"
    position, minutes, refusals, total, kl = hits[0]
    best = min(hits, key=lambda hit: (hit[2], hit[4]))
    return (
        f"trial {position} of {len(done)} ({minutes:.1f} min): {refusals}/{total} at KL {kl:.4f}; "
        f"best on target {best[2]}/{best[3]} at KL {best[4]:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("journals", nargs="+", type=Path)
    parser.add_argument("--max-share", type=float, default=0.1)
    parser.add_argument("--max-kl", type=float, default=0.05)
    args = parser.parse_args()
    for journal in args.journals:
        print(f"{journal}: {first_on_target(journal, args.max_share, args.max_kl)}")


if __name__ == "__main__":
    main()
