"""Running models across the mesh: stage sessions on shards (compute), route planning,
the generation run with failover and replay, spot checks, sampling and prompts."""
