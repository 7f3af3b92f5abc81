"""The file's non-architecture metadata: the embedded tokenizer and the provenance of the conversion."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import keys as K
from .errors import NQFormatError


@dataclass(frozen=True)
class TokenizerInfo:
    """The whole Hugging Face `tokenizer.json` as one string (one metadata read, not 100k array elements), the chat
    template and the special ids, so the file is all a user needs."""

    json: str
    chat_template: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False

    def to_metadata(self) -> dict[str, object]:
        meta: dict[str, object] = {K.TOKENIZER_JSON: self.json, K.ADD_BOS: self.add_bos}
        for key, value in ((K.CHAT_TEMPLATE, self.chat_template), (K.BOS_ID, self.bos_id), (K.EOS_ID, self.eos_id),
                           (K.PAD_ID, self.pad_id)):
            if value is not None and value != "":
                meta[key] = value
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, object]) -> "TokenizerInfo":
        _require(meta, (K.TOKENIZER_JSON, K.ADD_BOS))
        return cls(json=meta[K.TOKENIZER_JSON], chat_template=meta.get(K.CHAT_TEMPLATE), bos_id=meta.get(K.BOS_ID),
                   eos_id=meta.get(K.EOS_ID), pad_id=meta.get(K.PAD_ID), add_bos=meta[K.ADD_BOS])


@dataclass(frozen=True)
class Provenance:
    """Where the file came from. Nothing run-dependent but the date, so a resumed conversion is byte-identical."""

    converter_version: str
    preset: str
    recipe: str
    bits_target: float
    bits_achieved: float
    source_name: str
    source_sha256: str
    source_params: int
    calibration_sha256: str
    date: str

    def __post_init__(self) -> None:
        for name in ("bits_target", "bits_achieved"):  # stored as float32: keep memory and file identical
            object.__setattr__(self, name, float(np.float32(getattr(self, name))))

    _KEYS = {
        "converter_version": K.CONVERTER_VERSION, "preset": K.PRESET, "recipe": K.RECIPE,
        "bits_target": K.BITS_TARGET, "bits_achieved": K.BITS_ACHIEVED, "source_name": K.SOURCE_NAME,
        "source_sha256": K.SOURCE_SHA256, "source_params": K.SOURCE_PARAMS, "calibration_sha256": K.CALIB_SHA256,
        "date": K.DATE,
    }

    def to_metadata(self) -> dict[str, object]:
        return {key: getattr(self, name) for name, key in self._KEYS.items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, object]) -> "Provenance":
        _require(meta, tuple(cls._KEYS.values()))
        return cls(**{name: meta[key] for name, key in cls._KEYS.items()})


def _require(meta: dict[str, object], required: tuple[str, ...]) -> None:
    for key in required:
        if key not in meta:
            raise NQFormatError(f"metadata key {key!r} is missing")
