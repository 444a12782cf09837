"""``python -m nsa_flex``: the ``nsa-flex`` command line (see :mod:`nsa_flex.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
