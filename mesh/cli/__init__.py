"""The ``edgemesh`` console script (``mesh.cli.main:main``): one parser, a module per group
of subcommands, helpers they share in ``common``."""
