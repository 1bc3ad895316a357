"""After the search: pick a trial and act on it (actions): export it merged or as an adapter
(export, merge), score it on the held-out prompts, chat with it (chat), or publish an export on the
Hugging Face hub (upload)."""
