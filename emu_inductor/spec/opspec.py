"""OpSpec: the semantic configuration a fused op needs, as one hashable value.

It travels through the graph as a string argument of the `mxemu::*` ops (custom ops
take no dataclasses), and keys the generated kernels. Tile configs and dtypes are not
part of it: dtypes come from the tensors, tiles from the launcher.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from ..formats import FORMATS
from .activations import ACTIVATION_NAMES
from .schemes import ActQuant, Scheme, get_scheme

__all__ = ["OpSpec"]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    weight_fmt: str
    act_kind: str = "none"  # none | block | fp8_tensor
    act_fmt: Optional[str] = None
    act_scale_mode: Optional[str] = None
    act_recipe: Optional[str] = None
    act_rounding: str = "rne"
    activation: str = "silu"
    router_weight_on_input: bool = False
    fp6_layout: str = "quark"

    def __post_init__(self):
        if self.weight_fmt not in FORMATS:
            raise ValueError(f"weight_fmt: unknown format {self.weight_fmt!r}")
        if self.act_kind not in ("none", "block", "fp8_tensor"):
            raise ValueError(f"act_kind: expected none, block or fp8_tensor, got {self.act_kind!r}")
        if self.act_kind == "block" and self.act_fmt not in FORMATS:
            raise ValueError(f"act_fmt: unknown format {self.act_fmt!r}")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation: unknown activation {self.activation!r}")

    # -- conversions ---------------------------------------------------------------
    @classmethod
    def from_scheme(cls, scheme, *, activation: str = "silu", router_weight_on_input: bool = False,
                    fp6_layout: str = "quark") -> "OpSpec":
        s = get_scheme(scheme)
        a = s.act
        return cls(
            weight_fmt=s.weight_fmt.name,
            act_kind="none" if a is None else a.kind,
            act_fmt=a.fmt.name if a is not None and a.fmt is not None else None,
            act_scale_mode=a.scale_mode if a is not None else None,
            act_recipe=a.recipe if a is not None else None,
            act_rounding=a.rounding if a is not None else "rne",
            activation=activation,
            router_weight_on_input=router_weight_on_input,
            fp6_layout=fp6_layout,
        )

    def scheme(self) -> Scheme:
        act = None
        if self.act_kind != "none":
            act = ActQuant(self.act_kind, FORMATS[self.act_fmt] if self.act_fmt else None,
                           self.act_scale_mode, self.act_recipe, self.act_rounding)
        return Scheme(f"spec:{self.weight_fmt}/{self.act_kind}:{self.act_fmt}", FORMATS[self.weight_fmt], act)

    def to_str(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_str(cls, s: str) -> "OpSpec":
        if not isinstance(s, str):
            raise TypeError(f"spec: expected an OpSpec string (OpSpec.to_str()), got {type(s).__name__}")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"spec: not a valid OpSpec string: {s!r}") from e
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or "weight_fmt" not in d or not set(d) <= fields:
            raise ValueError(f"spec: expected a JSON object with weight_fmt and only the fields {sorted(fields)}, "
                             f"got {s!r}")
        return cls(**d)

    def short_name(self) -> str:
        """Readable id for logs, explain() and kernel file names."""
        act = "a16" if self.act_kind == "none" else (
            "afp8" if self.act_kind == "fp8_tensor" else f"a{self.act_fmt}-{self.act_scale_mode or self.act_recipe}")
        return f"w{self.weight_fmt}_{act}_{self.activation}" + ("_rwin" if self.router_weight_on_input else "")
