"""Merge edits into a safetensors checkpoint one tensor at a time.

Peak memory stays near the largest single tensor, whatever the model size: each tensor is
read from the source shard, gets its edit added in float32, is cast back to its stored
dtype and written straight into the output shard. safetensors has no incremental writer,
so `_write_shard` writes the format itself (an 8-byte header length, a JSON header,
then the raw bytes); the shard plan comes from huggingface_hub's splitter.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from apostate.model.architecture import ResidualWriter
from apostate.model.checkpoint_pages import checkpoint_mappings, drop_pages
from apostate.progress import track

INDEX_NAME = "model.safetensors.index.json"
# Files besides weights and tokenizer that a model folder needs to load.
MODEL_FILE_PATTERNS = ["config.json", "generation_config.json", "*.py"]
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

LazyDelta = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _SAFETENSORS_DTYPES[self.dtype].itemsize


class Checkpoint:
    """The tensors of a local safetensors checkpoint, read lazily."""

    def __init__(self, folder: Path, entries: list[TensorEntry]):
        self.folder = folder
        self.entries = entries
        self.by_name = {entry.name: entry for entry in entries}

    @classmethod
    def find(cls, folder: Path) -> Checkpoint | None:
        """The checkpoint in `folder`, or None where it has no safetensors weights."""
        index = folder / INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            return None
        entries = []
        for file in files:
            with safe_open(folder / file, framework="pt") as handle:
                for name in handle.keys():
                    tensor_slice = handle.get_slice(name)
                    entries.append(TensorEntry(name, folder / file, tensor_slice.get_dtype(),
                                               tuple(tensor_slice.get_shape())))  # fmt: skip
        return cls(folder, entries)

    def read(self, entry: TensorEntry) -> torch.Tensor:
        # Opened per tensor so the memory map (whose touched pages count as resident) is released.
        with safe_open(entry.file, framework="pt") as handle:
            return handle.get_tensor(entry.name)

    def mismatch(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why an edit of `shape` cannot be added to tensor `name` here; None if it can."""
        entry = self.by_name.get(name)
        if entry is None:
            return f"the checkpoint has no tensor '{name}'"
        if entry.shape != shape:
            return f"'{name}' is stored as {list(entry.shape)}, the edit is {list(shape)}"
        if not _SAFETENSORS_DTYPES[entry.dtype].is_floating_point:
            return f"'{name}' is stored as {entry.dtype} (quantized?)"
        return None


def parameter_name(writer: ResidualWriter) -> str:
    return f"{writer.path}.{writer.parameter or 'weight'}"


def stream_merge(
    checkpoint: Checkpoint, edits: dict[str, LazyDelta], output_dir: Path, max_shard_size: str | int
) -> list[str]:
    """Write checkpoint + edits to `output_dir` as safetensors shards; returns the shard names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    # Meta tensors carry shape and dtype only; the splitter needs nothing else to plan shards.
    placeholders = {
        entry.name: torch.empty(entry.shape, dtype=_SAFETENSORS_DTYPES[entry.dtype], device="meta")
        for entry in checkpoint.entries
    }
    plan = split_torch_state_dict_into_shards(placeholders, max_shard_size=max_shard_size)
    with track("merging", len(checkpoint.entries)) as advance:
        for filename, names in plan.filename_to_tensors.items():
            entries = [checkpoint.by_name[name] for name in names]
            _write_shard(output_dir / filename, entries, lambda e: _merged(checkpoint, e, edits), advance)
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (output_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return list(plan.filename_to_tensors)


def copy_model_files(source_folder: Path, output_dir: Path) -> None:
    for pattern in MODEL_FILE_PATTERNS:
        for path in source_folder.glob(pattern):
            shutil.copy2(path, output_dir / path.name)


def _merged(checkpoint: Checkpoint, entry: TensorEntry, edits: dict[str, LazyDelta]) -> torch.Tensor:
    tensor = checkpoint.read(entry)
    edit = edits.get(entry.name)
    if edit is None:
        return tensor
    return (tensor.float() + edit().to(torch.float32)).to(tensor.dtype)


def _write_shard(path: Path, entries: list[TensorEntry], tensor_of, advance) -> None:
    """A safetensors file written tensor by tensor, in the order of `entries`."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}  # fmt: skip
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for entry in entries:
            tensor = tensor_of(entry)
            if tuple(tensor.shape) != entry.shape or tensor.dtype != _SAFETENSORS_DTYPES[entry.dtype]:
                raise RuntimeError(f"{entry.name}: got {tensor.dtype} {list(tensor.shape)}, planned {entry}")
            _write_bytes(file, tensor.contiguous().reshape(-1).view(torch.uint8))
            advance(1)


def _write_bytes(file, data: torch.Tensor, chunk: int = 64 << 20) -> None:
    """Write a block at a time; blocks read from the mapped checkpoint leave memory once written."""
    mappings = checkpoint_mappings()
    for start in range(0, data.numel(), chunk):
        piece = data[start : start + chunk]
        file.write(piece.numpy())
        drop_pages(piece.data_ptr(), piece.data_ptr() + piece.numel(), mappings)
