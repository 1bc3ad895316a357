"""Getting the model ready: where its files are (sources, demo), loading it with a dtype that
works (loading, checkpoint_pages, bnb_weights, offload), finding the residual writers of every layer
(architecture), and the LoRA adapter every edit is written through (adapter)."""
