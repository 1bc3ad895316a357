"""Choose between equivalent ways of running a float32 product by timing both on this machine.

Three choices: the memory layout of a weight, whether a bfloat16 screen beats the float32
output projection (greedy_head), and which library multiplies a Linear layer's input: MKL
(what `F.linear` calls) or oneDNN, per range of rows. What is done with the choices is in
cpu_kernels.

How fast the CPU's GEMM runs depends on the processor as much as on the shapes. On the
demo model at 16 rows, one 2-core Intel machine with AVX-512 and AMX ran the MLP's gate and
up projections 1.4x faster from column-major weights and screened the output projection in
bfloat16 2x faster than float32; a 2-core AMD machine with AVX2 only ran the down
projection 1.4x slower column-major, and bfloat16 products 1.0-7x slower than float32 (no
bfloat16 instructions: 5.3 s instead of 1.3 s for the output projection at 320 rows, which
made every decoding pass with drafts ten times slower). So nothing is assumed: each choice
is timed once per weight shape, on a slice of the weight, and kept by the `KernelTimer`
that timed it (one per `CpuKernels`, so per loaded model). A run keeps its choices in its
folder (`KernelTimer.write`, `read_kernel_choices`), so that every trial of a run, resumed
or not, is computed the same way: timing noise in a new process could otherwise flip a
close choice, and with it the last digits of a KL divergence.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROWS = (16, 128)  # a decoding pass of batch-size rows; one with drafts, or a batch of prompts
SAMPLE_OUTPUTS = 4096  # output rows of the weight timed: the kernel's choice depends on the inner size
ROW_RANGES = ((48, 16), (256, 128), (None, 512))  # (most rows, rows timed): decoding, drafts, prompt batches
MARGIN = 0.95  # the other way must be at least 5% faster: timing noise never flips a choice back and forth


class KernelTimer:
    """Times the ways of computing a float32 product and remembers each choice per weight shape."""

    def __init__(self, choices: dict[str, bool | tuple[bool, ...]] | None = None):
        self.choices: dict[str, bool | tuple[bool, ...]] = dict(choices or {})
        # What was timed in this process, per weight shape, for the console (choices read from a
        # run folder were timed by the run that wrote them, and are not listed).
        self.measured: dict[str, list[str]] = {}

    def write(self, path: Path) -> None:
        """Keep the choices made so far in `path` (JSON), written whole or not at all."""
        scratch = path.with_name(f".{path.name}.{os.getpid()}.partial")  # workers may share the run folder
        scratch.write_text(json.dumps(self.choices, indent=1))
        os.replace(scratch, path)

    def column_major_pays(self, weight: torch.Tensor) -> bool:
        """Whether `F.linear` from a column-major copy of this row-major float32 weight beats the
        row-major weight with the faster of MKL and oneDNN (routing picks that per row range)."""
        key = _key("column-major", tuple(weight.shape), weight.dtype)
        if key not in self.choices:
            sample = weight.detach()[:SAMPLE_OUTPUTS].contiguous()
            transposed = sample.t().contiguous().t()
            ways = [
                partial(F.linear, weight=transposed),
                partial(F.linear, weight=sample),
                partial(onednn_linear, weight=sample),
            ]
            column_major = row_major = 0.0
            for x in _inputs(sample):
                column, mkl, onednn = _best_seconds(ways, x)
                column_major, row_major = column_major + column, row_major + min(mkl, onednn)
            self.choices[key] = column_major < MARGIN * row_major
            self._tell(weight, f"column-major {_ms(column_major)} against row-major {_ms(row_major)}")
        return self.choices[key]

    def bfloat16_screen_pays(self, weight: torch.Tensor) -> bool:
        """Whether a bfloat16 product with this float32 weight is faster than the float32 one."""
        key = _key("bfloat16", tuple(weight.shape), weight.stride(), weight.dtype)
        if key not in self.choices:
            sample = timing_sample(weight)
            screen = sample.to(torch.bfloat16)
            inputs = _inputs(sample)
            times = _times(lambda x: F.linear(x.to(torch.bfloat16), screen), lambda x: F.linear(x, sample), inputs)
            self.choices[key] = times[0] < MARGIN * times[1]
            self._tell(weight, f"bfloat16 screen {_ms(times[0])} against float32 {_ms(times[1])}")
        return self.choices[key]

    def onednn_pays(self, weight: torch.Tensor) -> tuple[bool, ...]:
        """Per row range (ROW_RANGES): whether oneDNN multiplies by this float32 weight faster than MKL."""
        key = _key("oneDNN", tuple(weight.shape), weight.stride(), weight.dtype)
        if key not in self.choices:
            sample = timing_sample(weight)
            rows = [timed for _, timed in ROW_RANGES]
            times = [
                _times(partial(onednn_linear, weight=sample), partial(F.linear, weight=sample), [x])
                for x in _inputs(sample, rows)
            ]
            self.choices[key] = tuple(onednn < MARGIN * mkl for onednn, mkl in times)
            pairs = ", ".join(
                f"{count} rows {_ms(onednn)}/{_ms(mkl)}" for count, (onednn, mkl) in zip(rows, times, strict=True)
            )
            self._tell(weight, f"oneDNN/MKL at {pairs}")
        return self.choices[key]

    def _tell(self, weight: torch.Tensor, timed: str) -> None:
        self.measured.setdefault("x".join(map(str, weight.shape)), []).append(timed)

    def report(self) -> list[str]:
        """One line per weight shape timed in this process: what each way took (best of 5 runs, the
        ways run in turn; another way is used only where it is at least 5% faster)."""
        return [f"{shape}: {'; '.join(timed)}" for shape, timed in self.measured.items()]


def timing_sample(weight: torch.Tensor) -> torch.Tensor:
    """The weight's first SAMPLE_OUTPUTS output rows, dense in the weight's own layout.

    A bare slice of a column-major weight is not dense: its columns keep the whole weight's
    stride, and oneDNN then reorders it at every product (37 s each for a slice of the demo's
    output projection, which stalled a start-up for over ten minutes whenever the column-major
    layout had been timed faster for it)."""
    sample = weight.detach()[:SAMPLE_OUTPUTS]
    if sample.is_contiguous():
        return sample
    return sample.t().contiguous().t() if weight.t().is_contiguous() else sample.contiguous()


def read_kernel_choices(path: Path) -> KernelTimer:
    """A timer holding the choices a run kept in `path`; an empty one where there are none
    (or the file is damaged: the choices are timed again, nothing else depends on them)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return KernelTimer()
    if not isinstance(stored, dict):
        return KernelTimer()
    return KernelTimer({key: tuple(value) if isinstance(value, list) else bool(value) for key, value in stored.items()})


def _key(*parts) -> str:
    return repr(parts)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` computed by oneDNN instead of MKL: float32 throughout, the sums in another order."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _inputs(weight: torch.Tensor, row_counts=ROWS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(rows, weight.shape[1], generator=generator, dtype=weight.dtype) for rows in row_counts]


@torch.inference_mode()
def _times(candidate: Callable, current: Callable, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """Seconds of `candidate` and of `current` over all inputs (each the best of a few runs)."""
    times = [_best_seconds([candidate, current], x) for x in inputs]
    return sum(first for first, _ in times), sum(second for _, second in times)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


def _best_seconds(functions: list[Callable], x: torch.Tensor, repeats: int = 5) -> list[float]:
    """Each function's best time on `x`, the functions run in turn, round after round: a burst
    of load on the machine slows whichever is running, so timing one way after the other could
    put the whole burst on one of them and flip the choice (a 1.5B model's start-up, with a test
    run beside it, made no weight column-major where an idle one made 29)."""
    for function in functions:
        function(x)  # warm-up: first calls pay for allocation and kernel selection
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function(x)
            best[index] = min(best[index], time.perf_counter() - start)
    return best
