"""A figure of the cost model with its kind and source (rentrain.speed_model, rentrain.setup_time, rentrain.costs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "published": a document says so; "derived": a stated rule applied to a published or measured figure;
# "measured": rentrain's benchmarks; "assumed": an engineering guess.
FigureKind = Literal["published", "derived", "measured", "assumed"]


@dataclass(frozen=True)
class Figure:
    value: float
    kind: FigureKind
    source: str
