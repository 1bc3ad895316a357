"""The Optuna search: what is measured once before the trials (startup), the study in its
journal (study), the trial loop (trials), and the Pareto front (pareto)."""
