import sys

from ptd.cli import main

sys.exit(main())
