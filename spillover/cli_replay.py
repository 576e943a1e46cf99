"""``python -m spillover.cli_replay``: the replayer where no console script is on PATH."""

from .cli import replay_main

replay_main()
