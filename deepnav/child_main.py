"""`python -m deepnav.child_main ARGS`: `deepnav ARGS` as a child process (deepnav.child_process)
that ends itself (exit status 1) as soon as its standard input closes, i.e. when the parent
(Slicer) is gone, even after a crash, so that no service or training outlives it. Kept apart from
child_process so that the parent side never imports the command line (and with it every module).
"""

from __future__ import annotations

import os
import sys
import threading


def main(argv: list[str]) -> int:
    def watch_parent() -> None:
        while os.read(0, 65536):  # the file descriptor, not sys.stdin: no buffer lock at shutdown
            pass
        os._exit(1)

    threading.Thread(target=watch_parent, name="deepnav-parent-watch", daemon=True).start()
    from deepnav.cli import main as deepnav_main

    return deepnav_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
