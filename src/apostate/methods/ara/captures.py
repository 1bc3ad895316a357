"""What each residual writer reads and writes at the last prompt position, for the harmless and
harmful direction prompts: the data Arbitrary-Rank Ablation fits its edits to.

Captured once per run with forward hooks and kept on the CPU. To keep the fit small, each
module's inputs are stored as coordinates in an orthonormal basis of the inputs' own span
(top singular directions): an edit that only acts inside that span changes every captured
output exactly as a full-width edit would, and leaves inputs never seen alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from apostate.decoding.batching import batches
from apostate.methods.ara.expert_captures import ExpertRecorder, expert_module
from apostate.methods.context import RunInputs
from apostate.model.adapter import Adapter
from apostate.progress import console, track


@dataclass
class ModuleCapture:
    """One writer's captured activations (float32, CPU)."""

    basis: Tensor  # (k, in): orthonormal rows spanning the captured inputs
    harmless_coords: Tensor  # (n_harmless, k): inputs in that basis
    harmful_coords: Tensor  # (n_harmful, k)
    harmless_outputs: Tensor  # (n_harmless, out): the base weight's outputs (bias left out: it cancels)
    harmful_outputs: Tensor  # (n_harmful, out)
    weight_norm: Tensor  # Frobenius norm of the base weight (the scale of the trust region)


CaptureKey = tuple[int, int]  # (slot index, expert); a plain Linear is expert 0


def capture_slots(adapter: Adapter) -> tuple[list[int], list[int], list[str]]:
    """Slot indices ARA can fit: Linear writers, fused standard experts; and what it cannot."""
    linear, experts, skipped = [], [], []
    for index, slot in enumerate(adapter.slots):
        if not slot.stacked:
            linear.append(index)
        elif expert_module(slot) is not None:
            experts.append(index)
        else:
            skipped.append(f"{slot.writer.path}.{slot.writer.parameter}")
    return linear, experts, skipped


class WriterInputRecorder:
    """Records what the residual writers at `slot_indices` read at the last `positions` prompt
    positions, over one pass of batches that another stage may run (the refusal directions'
    residual pass reads the same prompts in the same batches: one pass serves both).

    Used as a context manager around the pass (forward hooks on the writers), told how many
    texts it runs (`expect`) and each batch before its forward (`batch`). `captured` gives, per
    (slot, expert), the rows in prompt order (a prompt's positions together, first to last), on
    `keep_on`: a Linear writer has `positions` rows for every text; an expert only for the
    (text, position) tokens routed to it. Rows keep the dtype the model computed them in (a
    wider one would hold no more information);
    build_captures widens one module at a time.
    """

    def __init__(self, adapter: Adapter, slot_indices: list[int], keep_on="cpu", positions: int = 1):
        self.adapter = adapter
        self.slot_indices = slot_indices
        self.keep_on = keep_on
        self.positions = positions
        self.linear_rows: dict[int, _LinearRows] = {}
        self.recorders: dict[int, ExpertRecorder] = {}
        self.order: list[int] = []  # prompt indices, in the order the batches ran them
        self._handles: list = []

    def __enter__(self) -> WriterInputRecorder:
        for index in self.slot_indices:
            slot = self.adapter.slots[index]
            if slot.stacked:
                self.recorders[index] = ExpertRecorder(slot.module.get_base_layer(), self.keep_on, self.positions)
                self._handles.append(self.recorders[index].module.register_forward_hook(self.recorders[index]))
            else:
                self.linear_rows[index] = _LinearRows(self.keep_on, self.positions)
                self._handles.append(slot.module.get_base_layer().register_forward_hook(self.linear_rows[index]))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def expect(self, count: int) -> None:
        """The pass runs `count` texts: each Linear writer's rows get one buffer of that size."""
        for rows in self.linear_rows.values():
            rows.count = count

    def batch(self, indices: list[int], inputs: dict) -> None:
        """The next forward runs these prompts (indices into the pass's texts)."""
        for recorder in self.recorders.values():
            recorder.batch = (indices, *inputs["input_ids"].shape)
        prompts = torch.tensor(indices)  # one tensor shared by every writer's hook
        for rows in self.linear_rows.values():
            rows.indices = prompts
        self.order.extend(indices)

    def saw(self, count: int) -> bool:
        """Whether a whole pass over `count` texts was recorded (once each)."""
        return sorted(self.order) == list(range(count))

    def captured(self) -> dict[CaptureKey, Tensor]:
        captured = {
            (index, 0): rows.buffer.reshape(-1, rows.buffer.shape[-1]) for index, rows in self.linear_rows.items()
        }
        for index, recorder in self.recorders.items():
            for expert, expert_rows in recorder.per_expert().items():
                captured[(index, expert)] = expert_rows
        return captured


class _LinearRows:
    """Forward hook of one Linear writer: its inputs at each prompt's last `positions` positions,
    written in prompt order into one buffer for the whole pass (`count` prompts, told by
    WriterInputRecorder.expect). One allocation, not one small copy per batch: copies kept
    between a batch's freed activations fragment the heap (peak RSS more than doubled)."""

    def __init__(self, keep_on, positions: int):
        self.keep_on = keep_on
        self.positions = positions
        self.count = 0
        self.indices: Tensor | None = None  # the prompts of the batch being run
        self.buffer: Tensor | None = None  # (count, positions, in)

    def __call__(self, module, args, output) -> None:
        inputs = args[0][:, -self.positions :, :]
        if self.buffer is None:
            self.buffer = torch.empty((self.count, *inputs.shape[1:]), dtype=inputs.dtype, device=self.keep_on)
        self.buffer[self.indices.to(self.buffer.device)] = inputs.to(self.keep_on)


@torch.inference_mode()
def capture_writer_inputs(
    model,
    tokenizer,
    adapter: Adapter,
    slot_indices: list[int],
    texts: list[str],
    batch_size: int,
    device,
    label: str,
    keep_on="cpu",
    positions: int = 1,
) -> dict[CaptureKey, Tensor]:
    """Per (slot, expert), the inputs at the last `positions` prompt positions (WriterInputRecorder),
    from a pass of its own over `texts`."""
    with WriterInputRecorder(adapter, slot_indices, keep_on, positions) as recorder:
        recorder.expect(len(texts))
        with track(label, len(texts)) as advance:
            for indices, inputs in batches(tokenizer, texts, batch_size, device):
                recorder.batch(indices, inputs)
                model(**inputs, use_cache=False, logits_to_keep=1)
                advance(len(indices))
    return recorder.captured()


def build_captures(
    adapter: Adapter, harmless: dict[CaptureKey, Tensor], harmful: dict[CaptureKey, Tensor], basis_rank: int
) -> dict[CaptureKey, ModuleCapture]:
    """Captures for every (slot, expert) seen on both sides (an expert only one side reached is left alone)."""
    captures = {}
    current, weights = None, None
    for key in sorted(harmless.keys() & harmful.keys()):
        index, expert = key
        if index != current:  # one slot's dequantized weights in memory at a time
            current, weights = index, adapter.slots[index].base_weight()  # (experts, out, in)
        weight = weights[expert].to(harmless[key].device)
        good, bad = harmless[key].float(), harmful[key].float()
        basis = input_basis(torch.cat([good, bad]), basis_rank)
        captures[key] = ModuleCapture(
            basis=basis,
            harmless_coords=good @ basis.T,
            harmful_coords=bad @ basis.T,
            harmless_outputs=good @ weight.T,
            harmful_outputs=bad @ weight.T,
            weight_norm=weight.norm(),
        )
    return captures


def input_basis(inputs: Tensor, max_rank: int) -> Tensor:
    """Orthonormal (k, in) rows spanning `inputs` (top singular directions, numerically nonzero)."""
    _, singular_values, right = torch.linalg.svd(inputs.double(), full_matrices=False)
    keep = int((singular_values > singular_values[0] * 1e-6).sum().clamp(max=max_rank))
    return right[:keep].float()


SIDES = ("harmless", "harmful")


def direction_pass_recorders(adapter: Adapter, positions: int, keep_on="cpu") -> dict[str, WriterInputRecorder]:
    """A recorder per side, for the start-up's residual pass over the direction prompts to carry."""
    linear, experts, _ = capture_slots(adapter)
    return {side: WriterInputRecorder(adapter, linear + experts, keep_on, positions) for side in SIDES}


def capture_for_fitting(inputs: RunInputs, method_name: str) -> dict[CaptureKey, ModuleCapture]:
    """Module inputs and outputs on the direction prompts, for methods fitted to them (ARA): what
    the residual pass recorded (`inputs.recorded`, where it ran here), else from a pass of their own."""
    adapter = inputs.adapter
    linear, experts, skipped = capture_slots(adapter)
    for entry in skipped:
        console.print(f"[yellow]* not edited by {method_name}, experts of an unknown form:[/] {entry}")
    recorded = inputs.recorded or {}
    captured = {}
    for side in SIDES:
        texts = inputs.texts.of(side, "direction")
        recorder = recorded.get(side)
        if recorder is not None and recorder.saw(len(texts)):
            captured[side] = recorder.captured()
            continue
        if side == SIDES[0]:
            console.print("Capturing module inputs and outputs...")
        captured[side] = capture_writer_inputs(
            adapter.model,
            inputs.tokenizer,
            adapter,
            linear + experts,
            texts,
            inputs.batch_size,
            inputs.device,
            f"capturing ({side})",
            keep_on=inputs.keep_activations_on,
            positions=inputs.settings.fit_positions,
        )
    return build_captures(adapter, captured["harmless"], captured["harmful"], inputs.settings.basis_rank)


def capture_summary(captures: dict[CaptureKey, ModuleCapture]) -> dict[str, list[float]]:
    """A few numbers per capture (basis size, output norms, weight norm): enough for another
    worker to check that its own captures are the same without shipping them."""
    return {
        f"{index}:{expert}": [
            float(capture.basis.shape[0]),
            capture.harmless_outputs.double().norm().item(),
            capture.harmful_outputs.double().norm().item(),
            float(capture.weight_norm),
        ]
        for (index, expert), capture in sorted(captures.items())
    }
