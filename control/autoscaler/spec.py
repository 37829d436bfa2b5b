"""The autoscaler's view of a version's `autoscaling` block: `ScaleSpec` and `parse_spec` live
in the domain layer (services/mesh/domain/autoscaling.py), where the registry validates the
block with the same parser; this module keeps the autoscaler's imports where they were."""

from __future__ import annotations

from services.mesh.domain.autoscaling import ScaleSpec, parse_spec

__all__ = ["ScaleSpec", "parse_spec"]
