"""What leaves a run: an export merged or as an adapter (export, merge) with its model card
(card) and the record that rebuilds it (record), a chat with it (chat), or its publication on the
Hugging Face hub (upload)."""
