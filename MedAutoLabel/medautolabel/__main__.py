"""``python -m medautolabel`` runs the ``medautolabel`` command."""

from medautolabel.cli.app import run

run()
