"""The Optuna search: what is measured once before the trials (startup), the study and where it
lives (study, storage: a journal in the run folder, or a database that workers share), a shared
study's start-up, measured by one worker and checked by the others (shared_startup,
startup_lock, study_artifacts), the trial loop (trials), and the Pareto front (pareto)."""
