import sys

from relaunchd.cli import main

sys.exit(main())
