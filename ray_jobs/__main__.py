"""``python -m ray_jobs <command>``: the data plane's one command line."""

import sys

from ray_jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
