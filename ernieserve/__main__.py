import sys

from ernieserve.entrypoints.cli import main

sys.exit(main())
