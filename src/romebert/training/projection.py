"""One-sided gradient projection (RomeBERT's "gradient regularization").

Over the parameter set S, flattened into one vector each: c = <g_B, g_A> / ||g_A||^2 and
g_B' = g_B - min(c, 0) * g_A, so the part of g_B that points against the anchor g_A is removed and
nothing else changes. The caller adds g_A + g_B' (on S) and g_A + g_B (elsewhere).

The two gradients are passed in explicitly (not recovered by subtracting after a second backward,
as the reference did), which is what keeps this exact under gradient accumulation and data parallelism:
accumulate / all-reduce each of g_A and g_B first, then project once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ProjectionStats:
    dot: float
    norm_a: float
    norm_b: float
    cosine: float
    angle_deg: float
    projected: bool

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "gr_dot": self.dot,
            "gr_norm_a": self.norm_a,
            "gr_norm_b": self.norm_b,
            "gr_cosine": self.cosine,
            "gr_angle_deg": self.angle_deg,
            "gr_projected": self.projected,
        }


def project_conflicting(g_a: list[Tensor], g_b: list[Tensor]) -> tuple[list[Tensor], ProjectionStats]:
    """Return g_B' (same shapes as ``g_b``) and the angle / norms of the two gradients over S."""
    if len(g_a) != len(g_b):
        raise ValueError(f"{len(g_a)} tensors in g_A but {len(g_b)} in g_B")
    if not g_a:
        return [], ProjectionStats(0.0, 0.0, 0.0, 0.0, 90.0, False)
    # torch._foreach ops keep this to a handful of kernels, on the device, with no host copies but the
    # three scalars needed for the decision and the log.
    dot = torch.stack([torch.sum(a * b) for a, b in zip(g_a, g_b)]).sum()
    norm_a2 = torch.stack(torch._foreach_norm(g_a)).pow(2).sum()
    norm_b2 = torch.stack(torch._foreach_norm(g_b)).pow(2).sum()
    dot_f, na2, nb2 = (float(x) for x in torch.stack([dot, norm_a2, norm_b2]).tolist())
    norm_a, norm_b = math.sqrt(na2), math.sqrt(nb2)
    cosine = dot_f / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0
    angle = math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
    projected = na2 > 0 and dot_f < 0
    if projected:
        c = dot / norm_a2
        out = torch._foreach_add(list(g_b), list(g_a), alpha=-c.item())
    else:
        out = list(g_b)
    return out, ProjectionStats(dot_f, norm_a, norm_b, cosine, angle, projected)
