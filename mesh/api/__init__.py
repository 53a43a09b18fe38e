"""The node's HTTP API: the server, generation (incl. OpenAI-compatible) and storage routes,
and the topology page."""
