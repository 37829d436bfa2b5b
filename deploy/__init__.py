"""Local deployment helpers: private etcd and Postgres instances, launcher support."""
