"""Start-up measurement: what every trial is scored against, measured once per run, and the checks on it."""
