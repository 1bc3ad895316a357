"""Write a trial's model as one GGUF file, for llama.cpp, Ollama, LM Studio and koboldcpp.

The base came in as GGUF, so its file is the template (as the `gguf` package's own
`gguf_new_metadata` script copies a file): every metadata field (architecture, tokenizer, chat
template, special tokens) is copied as it is, and each tensor is streamed from the base file
to the new one, one at a time. An edited writer's tensor is the weight that was scored (the
base tensor dequantized, as the GGUF loader did, plus its edit B @ A in float32), then written
in the chosen type:

    same   each tensor in the base file's type; an edited one whose type the `gguf` package can
           only read (K- and IQ-quants) in the next writable type up (Q6_K -> Q8_0), said once
    f16, bf16, q8_0
           every matrix in that type (rows whose length is no multiple of the type's block in
           F16); vectors (norms, biases) stay as they were, as llama.cpp's converter keeps them

Unedited tensors in their own type are copied byte for byte. The architectures covered are those
whose residual writers the `gguf` package's tensor-name map names (llama, qwen2, qwen3, mistral,
gemma, phi3 and their MoE forms among them); an edit it cannot place is refused, never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from apostate.errors import ApostateError
from apostate.model.architecture import WriterEdit
from apostate.progress import console, track
from apostate.results.merge import parameter_name

GGUF_TYPES = ("same", "f16", "bf16", "q8_0")


def _gguf():
    import gguf  # transformers' GGUF reader needs it too; imported on use, it loads numpy codecs

    return gguf


def _writable_types(gguf) -> list:
    """Types the `gguf` package can write, smallest bits per weight first."""
    T = gguf.GGMLQuantizationType
    return [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16, T.F16, T.F32]


def _bits_per_weight(gguf, kind) -> float:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return 8 * size / block


def writable_type(gguf, kind):
    """`kind` if the gguf package can write it, else the writable type with the fewest bits per
    weight above it (so an edited tensor never loses precision to the export)."""
    writable = _writable_types(gguf)
    if kind in writable:
        return kind
    bits = _bits_per_weight(gguf, kind)
    return next(t for t in writable if _bits_per_weight(gguf, t) > bits)


def target_type(gguf, kind, shape: tuple[int, ...], choice: str):
    """The type a tensor of the base's type `kind` and element `shape` (rows last) is written in."""
    if choice == "same":
        return kind
    wanted = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}.get(
        choice, gguf.GGMLQuantizationType.Q8_0
    )
    if len(shape) < 2:
        return kind  # norms and biases
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def file_type(gguf, choice: str, base_file_type: int):
    """general.file_type of the written file."""
    if choice == "same":
        return base_file_type
    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(
        choice, gguf.LlamaFileType.MOSTLY_Q8_0
    )


def gguf_label(base_file: Path, choice: str) -> str:
    """The type in the file name, as GGUF repositories name files: Q8_0, F16, BF16, or the base's type."""
    if choice != "same":
        return choice.upper()
    gguf = _gguf()
    field = gguf.GGUFReader(base_file).get_field(gguf.Keys.General.FILE_TYPE)
    if field is None:
        return "same"
    return gguf.LlamaFileType(field.contents()).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def write_gguf(base_file: Path, edits: Iterable[WriterEdit], output_file: Path, choice: str) -> Path:
    """`base_file` with `edits` merged, written to `output_file` in `choice` (see GGUF_TYPES)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(base_file)
    architecture = _field(reader, gguf.Keys.General.ARCHITECTURE)
    by_tensor = _place_edits(gguf, reader, architecture, list(edits), base_file)
    writer = gguf.GGUFWriter(output_file, architecture)
    _copy_metadata(gguf, reader, writer, choice)
    plan = [(tensor, _written(gguf, tensor, choice, by_tensor.get(tensor.name))) for tensor in reader.tensors]
    _say_fallbacks(gguf, [(tensor, kind) for tensor, (kind, _) in plan if tensor.name in by_tensor], choice)
    for tensor, (kind, data) in plan:
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with track("writing GGUF", len(plan)) as advance:
        for _, (_, data) in plan:
            writer.write_tensor_data(data if isinstance(data, np.ndarray) else data())
            advance(1)
    writer.close()
    return output_file


def _say_fallbacks(gguf, edited: list, choice: str) -> None:
    """Once per type: edited tensors that could not be written in the type they would have had."""
    said = set()
    for tensor, kind in edited:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        wanted = target_type(gguf, tensor.tensor_type, shape, choice)
        if wanted != kind and wanted not in said:
            said.add(wanted)
            console.print(
                f"[yellow]GGUF: edited {wanted.name} tensors are written as {kind.name} (no {wanted.name} writer).[/]"
            )


class _Pending:
    """A tensor's data, computed when written (shape, dtype and size known before)."""

    def __init__(self, shape, dtype, nbytes, compute):
        self.shape, self.dtype, self.nbytes, self._compute = shape, dtype, nbytes, compute

    def __call__(self) -> np.ndarray:
        return self._compute()


def _written(gguf, tensor, choice: str, edit: WriterEdit | None):
    """(type, data) of a tensor as written: the base bytes where nothing changes, else data to
    compute at write time (so one tensor at a time is ever dequantized)."""
    base_kind = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape))  # numpy order: rows last
    kind = target_type(gguf, base_kind, shape, choice)
    if edit is not None:
        kind = writable_type(gguf, kind)
    if edit is None and kind == base_kind:
        return kind, tensor.data
    byte_shape = gguf.quant_shape_to_byte_shape(shape, kind) if _is_quantized(gguf, kind) else shape
    dtype = _numpy_dtype(gguf, kind)
    nbytes = int(np.prod(byte_shape)) * dtype.itemsize

    def compute():
        weight = gguf.quants.dequantize(tensor.data, base_kind).astype(np.float32).reshape(shape)
        if edit is not None:
            weight = weight + edit.compute().float().numpy().reshape(shape)
        return gguf.quants.quantize(weight, kind)

    return kind, _Pending(byte_shape, dtype, nbytes, compute)


def _is_quantized(gguf, kind) -> bool:
    T = gguf.GGMLQuantizationType
    return kind not in (T.F32, T.F16)


def _numpy_dtype(gguf, kind) -> np.dtype:
    T = gguf.GGMLQuantizationType
    return np.dtype({T.F32: np.float32, T.F16: np.float16}.get(kind, np.uint8))


def _place_edits(gguf, reader, architecture: str, edits: list[WriterEdit], base_file: Path) -> dict:
    """GGUF tensor name -> the edit of the writer stored there; refuses an edit it cannot place."""
    arch = next((key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise ApostateError(
            f"GGUF export: the gguf package does not know architecture '{architecture}' of {base_file.name}; "
            "save the merged model (safetensors) instead"
        )
    blocks = int(_field(reader, f"{architecture}.block_count"))
    names = gguf.get_tensor_name_map(arch, blocks)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    placed = {}
    for edit in edits:
        hf_name = parameter_name(edit.writer)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        tensor = tensors.get(name) if name else None
        shape = tuple(int(n) for n in reversed(tensor.shape)) if tensor is not None else None
        if tensor is None or int(np.prod(shape)) != int(np.prod(edit.shape)) or shape[-1] != edit.shape[-1]:
            found = f"{name} {shape}" if tensor is not None else "no tensor"
            raise ApostateError(
                f"GGUF export: the edit of {hf_name} {tuple(edit.shape)} has no matching tensor in "
                f"{base_file.name} ({found}; architecture '{architecture}'); save the merged model instead"
            )
        placed[name] = edit
    return placed


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise ApostateError(f"GGUF file has no '{key}' field; it cannot be a template for export")
    return field.contents()


def _copy_metadata(gguf, reader, writer, choice: str) -> None:
    """Every key as the base file has it (GGUFWriter writes the architecture and GGUF.* itself)."""
    file_type_key = gguf.Keys.General.FILE_TYPE
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == file_type_key:
            value = int(file_type(gguf, choice, value))
        writer.add_key_value(field.name, value, kind, sub_type=sub_type)
