"""Validation of what callers send the registry: names, digests, signatures, batching, device,
logging.

Every failure is an InvalidInput whose message starts with the offending field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from services.mesh.domain.errors import InvalidInput
from services.mesh.domain.types import (
    DEVICE_POLICIES,
    PREDICTION_LOG_POLICIES,
    BatchingPolicy,
    Signature,
)

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_name(value: Any, *, field: str) -> str:
    """`value` if it is a valid model or version name, else InvalidInput naming `field`."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidInput(
            f"{field}: must be 1-64 characters of letters, digits, '_', '.', '-' "
            "starting with a letter or digit"
        )
    return value


def check_sha256(sha256: str, *, field: str = "sha256") -> str:
    """`sha256` if it is 64 lowercase hex digits, else InvalidInput naming `field`."""
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise InvalidInput(f"{field}: must be 64 lowercase hex digits")
    return sha256


def parse_signature(raw: Any) -> Signature:
    """A signature from its JSON form; InvalidInput naming the bad field."""
    if not isinstance(raw, Mapping):
        raise InvalidInput("signature: must be an object with 'inputs' and 'outputs'")
    for side in ("inputs", "outputs"):
        specs = raw.get(side, [])
        if not isinstance(specs, list) or not all(isinstance(s, Mapping) for s in specs):
            raise InvalidInput(f"signature: '{side}' must be a list of objects")
    return Signature.from_json(raw)


def parse_batching(raw: Any) -> BatchingPolicy:
    """A batching policy from its JSON form (None: the defaults)."""
    if raw is None:
        return BatchingPolicy()
    if not isinstance(raw, Mapping):
        raise InvalidInput("batching: must be an object")
    try:
        # Defaults filled in here: BatchingPolicy.from_json cannot read them off a slots class.
        return BatchingPolicy.from_json({**BatchingPolicy().to_json(), **raw})
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"batching: {exc}") from None


def parse_device(raw: Any) -> str:
    """A device policy: auto, cuda or cpu."""
    if raw not in DEVICE_POLICIES:
        raise InvalidInput(f"device: must be one of {', '.join(DEVICE_POLICIES)}")
    return str(raw)


def parse_prediction_log(raw: Any) -> str:
    """A prediction log policy: full, digest or none."""
    if raw not in PREDICTION_LOG_POLICIES:
        raise InvalidInput(
            f"prediction_log: must be one of {', '.join(PREDICTION_LOG_POLICIES)}"
        )
    return str(raw)
