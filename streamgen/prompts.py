"""``python -m streamgen.prompts``: preview a run's samples and prompts (`streamgen.plan.preview`).

The prompt templates themselves are `streamgen.plan.prompts`.
"""

import sys

from streamgen.plan.preview import main

if __name__ == "__main__":
    sys.exit(main())
