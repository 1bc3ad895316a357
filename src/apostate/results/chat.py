"""Chat with a model in the terminal, the response streamed as it is generated."""

from __future__ import annotations

import torch
from transformers import TextStreamer

from apostate.decoding.generation import GREEDY
from apostate.progress import console


def chat(model, tokenizer, system_prompt: str | None, device, max_new_tokens: int = 1024) -> None:
    console.print("[dim]Chat with the model; an empty line or Ctrl+D ends the chat.[/]")
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    while True:
        try:
            user = console.input("[bold cyan]You:[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        console.print("[bold green]Model:[/] ", end="")
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                **GREEDY,
                max_new_tokens=max_new_tokens,
                streamer=streamer,
                pad_token_id=tokenizer.pad_token_id,
            )
        reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
