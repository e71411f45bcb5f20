"""`python -m edgerun ...`: see edgerun.cli."""
import sys

from edgerun.cli import main

sys.exit(main())
