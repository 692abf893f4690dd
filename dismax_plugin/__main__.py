"""``python -m dismax_plugin`` runs the ``dismax`` command line (also under ``torchrun``)."""

import sys

from dismax_plugin.adapters.engine.cli import main

sys.exit(main())
