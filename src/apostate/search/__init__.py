"""The Optuna study: where it lives, chosen once (home: the run folder's journal, or a database
that workers share, see workers/), making or resuming it (study), reading a run folder's
(reading), the trial loop (trials), and the Pareto front (pareto)."""
