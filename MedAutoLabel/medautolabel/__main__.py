"""``python -m medautolabel`` runs the ``medautolabel`` command."""

from .cli import run

run()
