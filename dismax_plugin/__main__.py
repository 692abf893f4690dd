"""``python -m dismax_plugin`` runs the ``dismax`` command line (also under ``torchrun``)."""

import sys

from .cli import main

sys.exit(main())
