"""Settings of Arbitrary-Rank Ablation (methods `ara` and `ara-lora`), nested as `[ara]`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from apostate.methods.ranges import RangeModel, range_field


class AraSettings(RangeModel):
    """How ARA fits each module, and the ranges its trial parameters are sampled from.

    Layer positions are fractions of the last layer index.
    """

    range_prefix: ClassVar[str] = "ara."

    objective: Literal["smooth", "knn"] = Field(
        default="smooth",
        description="'smooth': softmin distances and a bounded push-away term (cannot run away); "
        "'knn': hard k-nearest neighbours with an unbounded push-away term (the public form, kept for comparison).",
    )
    lora_rank: int = Field(default=8, ge=1, description="Rank of the edit optimized by 'ara-lora'.")
    lbfgs_steps: int = Field(default=25, ge=1, description="LBFGS iterations per module.")
    basis_rank: int = Field(
        default=256,
        ge=1,
        description="The edit acts on at most this many input directions per module: the top singular "
        "directions of the captured inputs (directions never seen in the inputs are left alone).",
    )
    fit_positions: int = Field(
        default=1,
        ge=1,
        le=16,
        description="How many of the last prompt positions each module is fitted at: 1, the last (where the "
        "answer's first token, and so the refusal, is decided); more reach back over the chat template's "
        "assistant header into the end of the request, where the model reads that it is harmful.",
        json_schema_extra={"added_later": True},
    )
    max_relative_edit: float = Field(
        default=0.25,
        gt=0,
        description="Trust region: an edit's Frobenius norm is capped at this fraction of the module weight's.",
    )
    layer_start: tuple[float, float] = range_field(0.0, 0.6, "Range of the first edited layer.", ge=0.0, le=1.0)
    layer_span: tuple[float, float] = range_field(
        0.2, 1.0, "Range of the number of edited layers (clipped at the last layer).", ge=0.0, le=1.0
    )
    preserve_weight: tuple[float, float] = range_field(
        0.5, 5.0, "Range of the weight of keeping harmless outputs where they were."
    )
    steer_weight: tuple[float, float] = range_field(
        0.0, 1.0, "Range of the weight of pulling harmful outputs toward harmless ones."
    )
    overcorrect_weight: tuple[float, float] = range_field(
        0.0, 1.5, "Range of the push away from the original harmful outputs, relative to the pull."
    )
    temperature: tuple[float, float] = range_field(
        0.02, 1.0, "Range of the softmin temperature ('smooth'; small = nearest neighbours, large = all)."
    )
    neighbours: tuple[int, int] = range_field(1, 16, "Range of the neighbour count ('knn').", ge=1)
