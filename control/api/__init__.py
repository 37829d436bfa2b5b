"""The control API: rollouts (weights, shadow, guard, rollback, history) over REST.

`python -m control.api` serves it; `RolloutStore` (core.py) is the logic, with no HTTP in it.
"""
