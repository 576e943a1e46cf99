"""spillover-replay that SIGKILLs itself right after its first Redis write, before the outbox commit."""

import os
import signal

from spillover.cli import replay_main
from spillover.outbox import Outbox


def _die(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


Outbox.mark_delivered = _die  # type: ignore[method-assign]
replay_main()
