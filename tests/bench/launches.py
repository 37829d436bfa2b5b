"""`bench.cpu_per_request.start_system` with the launcher faked: what a bench's arguments make
it start, without starting it."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path

import pytest

from bench import cpu_per_request


def fake_launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, str]]]:
    """Fake the launcher (and the plain server, and the bench tenant's key) behind
    `start_system`; returns the list each launch appends `(system, extra_env)` to."""
    started: list[tuple[str, dict[str, str]]] = []

    def start_launcher(stack: ExitStack, args: argparse.Namespace, logs: Path, system: str, *,
                       extra_env: dict[str, str]) -> str:
        started.append((system, extra_env))
        return "http://127.0.0.1:8000"

    monkeypatch.setattr(cpu_per_request, "start_launcher", start_launcher)
    monkeypatch.setattr(cpu_per_request, "start_plain", lambda stack, args, logs: "http://p")
    monkeypatch.setattr(cpu_per_request, "unlimited_tenant", lambda url, token: "key")
    monkeypatch.setattr(cpu_per_request, "remember_key", lambda url, key: None)
    return started
