"""``python -m spillover.cli_replay``: the replayer where no console script is on PATH."""

from .cli import replay_main

if __name__ == "__main__":
    replay_main()
