"""Does an exported GGUF run in llama.cpp itself? Builds llama-cpp-python from its source
distribution into a virtual environment of its own (once: it compiles llama.cpp with CMake, minutes
on 2 cores; no binary wheel is offered here), then answers prompts greedily with each GGUF file
given, through the chat template the file carries (llama.cpp's own Jinja formatter), and prints
the answers side by side.

    .venv/bin/python bench/llama_cpp_check.py BASE.gguf EDITED.gguf [...] --heldout RUN_DIR/heldout-answers-N.jsonl
        [--count 3] [--tokens 96] [--venv DIR]

--heldout: a run's held-out answers file (its prompts are used, in order); or --prompts FILE (one
prompt per line). The files' answers are printed per prompt, file by file, and as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VERSION = "0.3.36"

CHILD = r"""
import json, sys
from llama_cpp import Llama
files, prompts, tokens = json.loads(sys.argv[1])
answers = {}
for file in files:
    llm = Llama(model_path=file, n_ctx=2048, n_threads=2, verbose=False, seed=0)
    answers[file] = [
        llm.create_chat_completion(messages=[{"role": "user", "content": p}], temperature=0.0, max_tokens=tokens)[
            "choices"][0]["message"]["content"]
        for p in prompts
    ]
    del llm
print(json.dumps(answers))
"""


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    started = time.time()
    print(f"Building llama-cpp-python {VERSION} from source into {venv} (minutes)...", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"llama-cpp-python=={VERSION}"], check=True)
    print(f"built in {time.time() - started:.0f} s", flush=True)
    return python


def read_prompts(args) -> list[str]:
    if args.heldout:
        rows = [json.loads(line) for line in Path(args.heldout).read_text().splitlines() if line.strip()]
        return [row["prompt"] for row in rows[: args.count]]
    return [line for line in Path(args.prompts).read_text().splitlines() if line.strip()][: args.count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--heldout", type=Path)
    parser.add_argument("--prompts", type=Path)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "apostate" / "llama-cpp-venv")
    parser.add_argument("--json", type=Path, help="also write the answers here")
    args = parser.parse_args()
    if not (args.heldout or args.prompts):
        parser.error("give --heldout or --prompts")
    python = ensure_venv(args.venv)
    prompts = read_prompts(args)
    files = [str(path.resolve()) for path in args.files]
    started = time.time()
    out = subprocess.run(
        [str(python), "-c", CHILD, json.dumps([files, prompts, args.tokens])],
        capture_output=True, text=True, env={**os.environ, "LLAMA_LOG_LEVEL": "error"},
    )  # fmt: skip
    if out.returncode != 0:
        sys.exit(f"llama.cpp failed:\n{out.stderr[-3000:]}")
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"llama.cpp (llama-cpp-python {VERSION}), greedy, {args.tokens} tokens, {time.time() - started:.0f} s")
    for index, prompt in enumerate(prompts):
        print(f"\n### {prompt}")
        for file in files:
            print(f"\n{Path(file).name}:\n{answers[file][index].strip()}")
    if args.json:
        args.json.write_text(json.dumps({"prompts": prompts, "answers": answers}, indent=2))


if __name__ == "__main__":
    main()
