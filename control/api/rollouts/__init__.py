"""Models and rollouts over REST: routes, validation of a rollout write, its SQL, its OpenAPI
part. The logic that runs them (Postgres first, then etcd) is `RolloutStore` in core.py."""
