"""The content-addressed store: chunks, manifests, fetch from the nearest holders, provider
records, replication, quotas and the fast path."""
