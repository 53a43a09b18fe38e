"""The node's one content-addressed store (data objects and model shards alike): chunks,
manifests, packed objects, fetch from the nearest holders, provider records, replication,
quotas, pins, GC and the fast path."""
