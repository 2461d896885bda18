"""``python -m metalab`` (and ``torchrun ... -m metalab train ...``): the command line."""

import sys

from metalab.cli import main

sys.exit(main())
