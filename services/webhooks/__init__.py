"""Outgoing webhooks per the Standard Webhooks spec (standard-webhooks/standard-webhooks).

    signing     whsec_ secrets, `v1,` HMAC-SHA256 signatures, receiver-side verification
    targets     where a webhook may go: the tenant's allowlist, never a private address (SSRF)
    outbox      delivery rows written in the caller's transaction (a job and its webhook commit
                together, or neither does)
    dispatcher  the loop that claims due deliveries, POSTs them, records every attempt and
                retries with backoff and full jitter
    backoff     the pure retry policy the dispatcher feeds

A durable subsystem, so its own package (STYLE.md, "Where new things go"), like
`services/predlog/`. See docs/WEBHOOKS.md.
"""
