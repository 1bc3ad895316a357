"""Skip the unedited first layers of fixed prompt passes: replay what the base model computed there.

An edit changes the model only from its first edited layer on. Below it, a pass over the
same prompts (same batch, same padding, same prefix cache) computes exactly what the base
model computed, so those layers' outputs are recorded once and replayed: the first edited
layer gets its recorded input, and the layers below it do not run. For prompts that go on
to generate, the replayed layers also put their recorded keys and values into the cache.
In the demo model's side-by-side run the first edit sat at layer 9.5 of 24 on average, so
40% of the layers of every prompt pass (the KL pass, the prompts before generation) is saved.

Records grow as passes run: a pass with k unchanged layers records any of those k that
its record lacks, so a resumed run (whose base scores came from disk) fills them too.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from apostate.model.architecture import decoder_layer_list

ALL_LAYERS = 1 << 30  # `unchanged` for a model without any edit


def unchanged_layers(edited_layers: set[int]) -> int:
    """How many leading decoder layers an edit of `edited_layers` leaves as the base model's."""
    return min(edited_layers, default=ALL_LAYERS)


@dataclass
class _Record:
    outputs: list[torch.Tensor] = field(default_factory=list)  # per layer, (rows, slots, hidden)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer, the pass's own slots
    values: list[torch.Tensor] = field(default_factory=list)


class LayerReplay:
    """Recorded layer outputs of the passes over one fixed set of prompts, keyed by the batch's prompts."""

    def __init__(self, with_cache: bool):
        self.with_cache = with_cache  # the passes' keys and values are used afterwards
        self.records: dict[tuple[int, ...], _Record] = {}

    @contextmanager
    def around(self, model, batch: tuple[int, ...], unchanged: int, prefix_length: int):
        """Run one pass with its first `unchanged` layers replayed where recorded, recorded where not.

        The caller stores the pass's output cache with `keep_cache` before the context ends.
        """
        layers = _decoder_layers(model)
        if layers is None or unchanged <= 0:
            yield None
            return
        unchanged = min(unchanged, len(layers))
        record = self.records.setdefault(batch, _Record())
        replayed = min(unchanged, len(record.outputs), len(record.keys) if self.with_cache else len(layers))
        originals = [layers[i] for i in range(replayed)]
        hooks = [
            layers[i].register_forward_hook(lambda _m, _a, output, i=i: self._keep_output(record, i, output))
            for i in range(len(record.outputs), unchanged)
        ]
        for i in range(replayed):
            layers[i] = _Replayed(i, record, last=i == replayed - 1, with_cache=self.with_cache)
        try:
            yield _CacheKeeper(self, record, unchanged, prefix_length)
        finally:
            for i, original in enumerate(originals):
                layers[i] = original
            for hook in hooks:
                hook.remove()

    @staticmethod
    def _keep_output(record: _Record, layer: int, output) -> None:
        if len(record.outputs) == layer:
            record.outputs.append((output[0] if isinstance(output, tuple) else output).clone())


@dataclass
class _CacheKeeper:
    replay: LayerReplay
    record: _Record
    unchanged: int
    prefix_length: int

    def keep_cache(self, cache) -> None:
        """Record the unchanged layers' keys and values of this pass (the slots after the shared prefix)."""
        if not self.replay.with_cache:
            return
        for i in range(len(self.record.keys), self.unchanged):
            self.record.keys.append(cache.layers[i].keys[:, :, self.prefix_length :])
            self.record.values.append(cache.layers[i].values[:, :, self.prefix_length :])


class _Replayed(nn.Module):
    """Stands in for decoder layer `index`: its recorded cache entries, and the recorded output if last."""

    def __init__(self, index: int, record: _Record, last: bool, with_cache: bool):
        super().__init__()
        self.index, self.record, self.last, self.with_cache = index, record, last, with_cache

    def forward(self, hidden_states, *args, cache=None, **kwargs):
        if self.with_cache:
            if cache is None:  # never replay silently wrong
                raise RuntimeError(f"decoder layer {self.index} was called without a cache to replay into")
            cache.update(self.record.keys[self.index], self.record.values[self.index], self.index)
        return self.record.outputs[self.index] if self.last else hidden_states


def _decoder_layers(model) -> nn.ModuleList | None:
    """The decoder layers, where they take their cache as `cache=` (else nothing is replayed)."""
    layers = decoder_layer_list(model)
    return layers if layers is not None and "cache" in inspect.signature(layers[0].forward).parameters else None
