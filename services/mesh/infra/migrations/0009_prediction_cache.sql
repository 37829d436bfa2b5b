-- How the router's prediction cache served each prediction (docs/CACHE.md): 'miss' (executed),
-- 'hit' (from the cache), 'coalesced' (shared an identical request's execution); NULL when the
-- version is not cached.
ALTER TABLE predictions ADD COLUMN cache text;
