"""``python -m wsi_espnet`` runs the command line."""

import sys

from wsi_espnet.cli import main

sys.exit(main())
