"""Model reports over REST: the route, the query string's validation, the store (the
prediction log joined with feedback in Postgres) and their OpenAPI part."""
