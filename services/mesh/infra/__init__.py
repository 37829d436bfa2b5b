"""Infrastructure: etcd, Postgres, publishing, settings, telemetry, metrics, health, runtime."""
