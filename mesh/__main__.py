import sys

try:
    from mesh.cli.main import main
except KeyboardInterrupt:  # Ctrl-C while the command is still loading: no traceback
    sys.exit(130)

sys.exit(main())
