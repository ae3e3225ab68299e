"""``python -m canet`` runs the ``canet`` command."""

import sys

from .cli import main

sys.exit(main())
