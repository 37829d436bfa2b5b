"""The router: picks the model version for each request from the rollout record."""
