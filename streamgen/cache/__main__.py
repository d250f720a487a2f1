"""``python -m streamgen.cache build|info|verify|export``: the cache's command line (`streamgen.launch.cache_cli`)."""

import sys

from streamgen.launch.cache_cli import main

if __name__ == "__main__":
    sys.exit(main())
