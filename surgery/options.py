"""PruneOptions: every option of a prune, validated once, as one frozen value.

The CLI, ``surgery.prune``, the sequential loop and the PyTorch path all build one, so a
bad value gets the same one-line error wherever it enters, and a stage reads the option
it needs by name instead of taking two dozen keyword arguments.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Iterable

from surgery.errors import SurgeryError

RATIO_FLAGS = (("ratio", "ratio"), ("head_ratio", "head-ratio"), ("mlp_ratio", "mlp-ratio"),
               ("hidden_ratio", "hidden-ratio"), ("head_dim_ratio", "head-dim-ratio"))
COMPENSATIONS = ("bias", "lstsq")


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    ratio: float | None = None  # 0.5 unless a target is given
    criterion: Any = "l2"  # a registered name, or a Criterion object (passes/criteria_core.py)
    global_rank: bool = False
    round_to: int = 1
    keep: tuple[str, ...] = ()
    seed: int = 0
    input_shapes: dict[str, tuple[int, ...]] | None = None
    verify_result: bool = True
    head_ratio: float | None = None
    mlp_ratio: float | None = None
    hidden_ratio: float | None = None
    head_dim_ratio: float = 0.0
    gqa: str = "kv"
    target_params: float | None = None  # targets: passes/targets.py
    target_flops: float | None = None
    calib: Any = None  # calibration: passes/stats.py
    calib_samples: int | None = None
    calib_batch: int = 16
    compensate: str | None = None  # compensation: passes/compensate.py
    loss: Any = None  # PyTorch path only: the loss of the taylor criterion
    strict_config: bool = True  # PyTorch path only: refuse what from_pretrained cannot reload

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", _names(self.keep))
        for field, flag in RATIO_FLAGS:
            r = getattr(self, field)
            if r is not None and not (isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1):
                raise SurgeryError(f"--{flag} must be in [0, 1), got {r}")
        if self.gqa not in ("kv", "query"):
            raise SurgeryError(f"--gqa must be 'kv' or 'query', got {self.gqa!r}")
        _whole(self.round_to, "--round-to", 1)
        _whole(self.seed, "--seed", 0)
        _whole(self.calib_batch, "--calib-batch", 1)
        if self.calib_samples is not None:
            _whole(self.calib_samples, "--calib-samples", 1)
        if self.compensate is not None and self.compensate not in COMPENSATIONS:
            raise SurgeryError(f"--compensate must be 'bias' or 'lstsq', got {self.compensate!r}")

    @classmethod
    def from_kwargs(cls, caller: str, **kwargs) -> "PruneOptions":
        """Options from keyword arguments; an unknown name is the TypeError Python gives."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument '{unknown[0]}'")
        return cls(**kwargs)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments (shallow: calibration data is not copied)."""
        return {name: getattr(self, name) for name in self.names()}

    def replace(self, **changes) -> "PruneOptions":
        return dataclasses.replace(self, **changes)


def _names(keep: Iterable[str] | str | None) -> tuple[str, ...]:
    if keep is None:
        return ()
    if isinstance(keep, str):
        return (keep,)
    return tuple(keep)


def _whole(value, flag: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise SurgeryError(f"{flag} must be a whole number >= {least}, got {value!r}")
