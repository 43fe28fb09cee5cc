"""`python -m livingai_tasks.cli`: the same as the `livingai-tasks` command."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
