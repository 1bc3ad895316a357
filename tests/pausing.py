"""Run apostate in a real process that pauses inside one phase, so that a test can signal it there.

    python tests/pausing.py PHASE [AFTER] -- apostate arguments...

PHASE: `load` (inside the model load), `start-up` (inside the start-up measurements, after the
batch size and before the refusal directions), `trial` (inside the trial that starts once
AFTER trials are finished), `export` (after the first shard of a merged export is written);
`slow` pauses nowhere but makes every trial AFTER tenths of a second longer.
On reaching it the process prints `PAUSED <phase>` on stdout and sleeps; a signal then lands
where a user's Ctrl+C or a kill would.
"""

from __future__ import annotations

import signal
import sys
import time


def pause(phase: str) -> None:
    print(f"PAUSED {phase}", flush=True)
    time.sleep(600)


def pause_before(module, name: str, phase: str) -> None:
    original = getattr(module, name)

    def paused(*args, **kwargs):
        pause(phase)
        return original(*args, **kwargs)

    setattr(module, name, paused)


def install(phase: str, after: int) -> None:
    if phase == "load":
        from apostate.model import loading

        pause_before(loading, "_from_pretrained", phase)
    elif phase == "start-up":
        from apostate.startup import measure as startup

        pause_before(startup, "measure_directions", phase)
    elif phase == "trial":
        from apostate.search.study import finished
        from apostate.search.trials import TrialRunner

        original = TrialRunner.__call__

        def paused_trial(self, trial):
            if len(finished(trial.study)) >= after:
                pause(phase)
            return original(self, trial)

        TrialRunner.__call__ = paused_trial
    elif phase == "slow":  # not a pause: every trial takes AFTER tenths of a second longer
        from apostate.search.trials import TrialRunner

        original = TrialRunner.__call__

        def slow_trial(self, trial):
            time.sleep(after / 10)
            return original(self, trial)

        TrialRunner.__call__ = slow_trial
    elif phase == "export":
        from apostate.results import merge

        write_shard = merge._write_shard

        def write_then_pause(path, *args):
            write_shard(path, *args)
            pause(phase)

        merge._write_shard = write_then_pause
    else:
        raise SystemExit(f"unknown phase {phase}")


if __name__ == "__main__":
    # Ctrl+C as a user's terminal delivers it. Started from a background job, this process
    # inherits SIGINT ignored (the shell ignores it there), and the signal tests would wait
    # for a process that never stops.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    split = sys.argv.index("--")
    phase, *rest = sys.argv[1:split]
    install(phase, int(rest[0]) if rest else 0)
    from apostate.cli import main

    sys.exit(main(sys.argv[split + 1 :]))
