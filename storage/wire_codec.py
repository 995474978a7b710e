"""How a sender packs knowledge on the wire (``distill.value_bits``, ``distill.feature_bits``).

Kept apart from the codec itself (``storage/knowledge_codec.py``, numpy) so that the job config can
name it without importing numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

VALUE_BITS = (8, 16, 32)  # 32: the float32 values as computed (nothing packed)
FEATURE_BITS = (8, 16)


@dataclass(frozen=True)
class WireCodec:
    value_bits: int = 32
    feature_bits: int = 16

    def __post_init__(self) -> None:
        if self.value_bits not in VALUE_BITS:
            raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {self.value_bits!r}")
        if self.feature_bits not in FEATURE_BITS:
            raise ValueError(f"feature_bits must be one of {FEATURE_BITS}, got {self.feature_bits!r}")

    @property
    def packs_topk(self) -> bool:
        return self.value_bits < 32
