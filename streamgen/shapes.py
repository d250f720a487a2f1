"""``python -m streamgen.shapes val DIR --classes SPEC``: the shapes benchmark's held-out
validation set (`streamgen.generate.shapes`, the ``--model shapes`` generator)."""

import sys

from streamgen.generate.shapes import main

if __name__ == "__main__":
    sys.exit(main())
