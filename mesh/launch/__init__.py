"""Starting and driving node processes on this machine: local meshes for the demo,
benchmarks and tests."""
