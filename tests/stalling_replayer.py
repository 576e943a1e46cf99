"""spillover-replay that SIGSTOPs itself with its first batch in hand, just before sending it to Redis.

A test SIGCONTs it later, once its lease has expired and a standby has taken the queue over.
"""

import os
import signal

from spillover.cli import replay_main
from spillover.pusher import Pusher

_send = Pusher._send
_stalled = False


def _stall_once(self: Pusher, args: list[object]) -> object:
    global _stalled
    if not _stalled:
        _stalled = True
        os.kill(os.getpid(), signal.SIGSTOP)
    return _send(self, args)


Pusher._send = _stall_once  # type: ignore[method-assign,assignment]
replay_main()
