"""Peak RSS of the refusal directions' residual pass, with and without ARA's recorders riding on it.

    .venv/bin/python bench/capture_memory.py MODEL_FOLDER [--recorders|--no-recorders] [--batch-size 16] [--positions 1]

One process per measurement (peak RSS is per process): loads the model at float32, attaches
the adapter, and runs the residual pass over both sides' direction prompts (the default
settings' prompt counts) as a run's start-up does. Prints the RSS after loading, the peak,
the live RSS after the pass, and how many bytes the recorders hold. The peak minus what is
live is memory the process took and never gave back (heap fragmentation).
"""

from __future__ import annotations

import argparse
import resource
import time

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apostate.directions.residuals import residual_means
from apostate.methods.ara.captures import direction_pass_recorders
from apostate.model.adapter import attach_adapter
from apostate.model.architecture import discover
from apostate.prompts import load_prompt_splits
from apostate.settings import Settings

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--recorders", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--positions", type=int, default=1)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    adapter = attach_adapter(model, discover(model), 4)
    loaded = psutil.Process().memory_info().rss / GIB
    prompts = load_prompt_splits(Settings(model=args.model))
    recorders = direction_pass_recorders(adapter, args.positions) if args.recorders else {}
    start = time.perf_counter()
    for side in ("harmless", "harmful"):
        chats = [[{"role": "user", "content": prompt}] for prompt in getattr(prompts, side).direction]
        texts = tokenizer.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
        residual_means(model, tokenizer, texts, args.batch_size, "cpu", 1.0, side, observer=recorders.get(side))
    seconds = time.perf_counter() - start
    held = sum(rows.numel() * rows.element_size() for r in recorders.values() for rows in r.captured().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    live = psutil.Process().memory_info().rss / GIB
    print(
        f"recorders {'on' if args.recorders else 'off'}: loaded {loaded:.2f} GiB, peak {peak:.2f} GiB, "
        f"live after the pass {live:.2f} GiB, recorded rows {held / GIB:.3f} GiB, pass {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
