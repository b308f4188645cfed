import sys

from ptd.cli import main

if __name__ == "__main__":  # not when a spawned worker (ptd.jobs) imports the parent's main module
    sys.exit(main())
