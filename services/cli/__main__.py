"""`python -m services.cli`: the same as the `orderflow` console script."""

from services.cli.main import app

app()
