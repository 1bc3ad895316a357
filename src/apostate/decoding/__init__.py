"""Running prompts through a model fast and exactly.

The public seam is `PromptSet` (prompt_set.py): a fixed set of chat texts for one model, with
first-token log-probabilities and greedy responses. Behind it: the shared chat-template prefix
(prefix_cache), replay of unedited layers (layer_replay), greedy decoding with earlier
responses as drafts (speculative, response_pool), decoding passes on real tokens only
(real_positions), and plain paths (batching, generation). `CpuKernels` (cpu_kernels) applies
the CPU kernel choices timed on this machine (kernel_timing) and holds the greedy head
(greedy_head).
"""

from apostate.decoding.batching import batches
from apostate.decoding.cpu_kernels import CpuKernels
from apostate.decoding.generation import GREEDY
from apostate.decoding.prompt_set import PromptSet

__all__ = ["GREEDY", "CpuKernels", "PromptSet", "batches"]
