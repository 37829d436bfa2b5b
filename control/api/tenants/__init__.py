"""Tenants, API keys and model limits over REST: routes, validation, the store (Postgres) with
its SQL, the publisher (etcd), and their OpenAPI part."""
