"""``python -m lepton_automl.cli``: the ``lepton`` command."""

import sys

from lepton_automl.cli import app

sys.exit(app())
