"""``python -m spillover``: the admin CLI."""

from .cli import main

main()
