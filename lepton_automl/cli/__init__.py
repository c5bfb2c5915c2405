"""The ``lepton`` command: the application is built in ``_app`` and each module below adds its commands."""

from lepton_automl.cli import reporting, serving
from lepton_automl.cli._app import app

COMMAND_MODULES = (reporting, serving)  # imported for the commands they register on ``app``

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app()
