"""ESamp recipe knobs, as one frozen dataclass shared by the core and the server patch."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Literal

Init = Literal["random", "svd", "base"]
MixVariant = Literal["plain", "orthogonal", "rescaled", "tempered", "learned"]
FilterMode = Literal["pre", "post"]
Optimizer = Literal["sgd", "adamw"]
DecodePath = Literal["auto", "graph"]

INITS: tuple[str, ...] = ("random", "svd", "base")
MIX_VARIANTS: tuple[str, ...] = ("plain", "orthogonal", "rescaled", "tempered", "learned")
FILTER_MODES: tuple[str, ...] = ("pre", "post")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
DECODE_PATHS: tuple[str, ...] = ("auto", "graph")
SOURCE_LAYER = re.compile(r"layer:(\d+)")

# The server processes SGLang spawns read ESamp's config from this variable; its presence is
# what switches ESamp on (a plain `python -m sglang.launch_server` does not set it).
ENV_VAR = "ESAMP_SGL_CONFIG"


@dataclass(frozen=True)
class ESampConfig:
    """How distillers are built, trained and mixed in. Defaults are the reference recipe except:
    rank 32 + SGD, which keeps a group at ≈ 1.6 MB at d = 4096 (see bytes_per_group); init
    "base" and filter mode "post", the recipe the quality benchmark found least harmful
    (benchmarks/README.md: from random weights the mix lowers pass@16 far below plain sampling).

    source "embed": the shallow state is the layer-0 input norm of the token embedding (the
    reference's choice; context-free, computed from input ids). "layer:N": the un-normalized
    residual stream after decoder layer N, captured by the model itself.

    beta_halflife > 0: a request's β halves every ``beta_halflife`` generated tokens (explore
    where an answer's path is chosen, then let the model finish it); 0 keeps β constant.

    decode_path "auto": inside SGLang's decode CUDA graphs the graph form of the step
    (esamp_sgl/graph_rows.py), where decode runs eagerly the faster slot-grouped form. "graph":
    the graph form on every decode step, eager ones too — how a machine without a GPU checks
    the logic the graphs replay."""

    rank: int = 32
    init: Init = "base"
    init_std: float = 0.02
    gate_bias: float = 1.0
    optimizer: Optimizer = "sgd"
    lr: float = 1e-3
    steps_per_decode: int = 1
    warmup_steps: int = 0
    staleness: int = 1
    mix: MixVariant = "plain"
    filter_mode: FilterMode = "post"
    max_groups: int = 64
    group_ttl: float = 600.0
    max_beta: float = 4.0
    beta_halflife: float = 0.0
    source: str = "embed"
    decode_path: DecodePath = "auto"

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "rank", self.rank, "must be >= 1")
        _check(self.init in INITS, "init", self.init, f"must be one of {INITS}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        _check(self.mix in MIX_VARIANTS, "mix", self.mix, f"must be one of {MIX_VARIANTS}")
        _check(self.filter_mode in FILTER_MODES, "filter_mode", self.filter_mode, f"must be one of {FILTER_MODES}")
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(self.steps_per_decode >= 1, "steps_per_decode", self.steps_per_decode, "must be >= 1")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.staleness >= 0, "staleness", self.staleness, "must be >= 0")
        _check(self.max_groups >= 1, "max_groups", self.max_groups, "must be >= 1")
        _check(self.max_beta > 0, "max_beta", self.max_beta, "must be > 0")
        _check(self.group_ttl >= 0, "group_ttl", self.group_ttl, "must be >= 0")
        _check(self.beta_halflife >= 0, "beta_halflife", self.beta_halflife, "must be >= 0 (0: constant β)")
        _check(self.decode_path in DECODE_PATHS, "decode_path", self.decode_path, f"must be one of {DECODE_PATHS}")
        _check(self.source == "embed" or SOURCE_LAYER.fullmatch(self.source) is not None, "source", self.source,
               "must be 'embed' or 'layer:N'")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def source_layer(self) -> int | None:
        """N for source "layer:N", None for "embed"."""
        match = SOURCE_LAYER.fullmatch(self.source)
        return None if match is None else int(match.group(1))

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "ESampConfig | None":
        """The config ``esamp-sgl serve`` handed to this process, or None when ESamp is off."""
        raw = os.environ.get(ENV_VAR)
        return None if raw is None else cls(**json.loads(raw))


def scheduled_beta(beta: float, generated: int, halflife: float) -> float:
    """The β a request mixes with after ``generated`` output tokens."""
    return beta if halflife == 0 else beta * 0.5 ** (generated / halflife)


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"ESamp config {name}={value!r}: {rule}")


def bytes_per_group(d: int, cfg: ESampConfig, dtype_bytes: int = 4) -> int:
    """Memory one group's slot holds: weights, plus optimizer state (AdamW: two moments)."""
    r = cfg.rank
    params = 3 * d * r + r + 2 * d  # A, G: d×r; B: r×d; gate bias: r; LayerNorm weight, bias: d
    state = 2 * params if cfg.optimizer == "adamw" else 0
    return (params + state) * dtype_bytes
