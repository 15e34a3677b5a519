"""``make serve``'s supervisor: the engine service and the tokenizer service in front of it, as one unit.

- Ctrl-C or SIGTERM (to this process, or to ``make``, which passes SIGTERM on): each service gets one
  SIGTERM and drains (its ``--grace-period``); a second signal kills them. Exit 0 once both stopped.
- Either service exiting on its own (a crash, an engine death, a bad option, a port in use): the other
  is stopped and this exits 1, so ``make`` fails and an outer supervisor can restart the pair.
- The services run in their own process groups: a terminal's Ctrl-C reaches only this process, which
  passes it on exactly once (a second SIGINT straight to a draining service would cut its grace).

Run it with the Python the services are installed in: the options it shares with them (``--model``, the
default ports) come from ``service_common.options``.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from service_common.options import ENGINE_PORT, TOKENIZER_PORT, add_model_option


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/serve.py", description=__doc__.split("\n\n")[0])
    add_model_option(p, "what both services read (weights, tokenizer, chat template)")
    p.add_argument(
        "--engine-port", type=int, default=ENGINE_PORT, help="the engine service's --port (default: %(default)s)"
    )
    p.add_argument(
        "--tokenizer-port",
        type=int,
        default=TOKENIZER_PORT,
        help="the tokenizer service's --port (default: %(default)s)",
    )
    p.add_argument(
        "--engine-args", default="", help="more engine_service options, one shell-quoted string (default: none)"
    )
    p.add_argument(
        "--tokenizer-args", default="", help="more tokenizer_service options, one shell-quoted string (default: none)"
    )
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {
        "engine": [
            sys.executable,
            "-m",
            "engine_service",
            "--model",
            args.model,
            "--port",
            str(args.engine_port),
            *shlex.split(args.engine_args),
        ],
        "tokenizer": [
            sys.executable,
            "-m",
            "tokenizer_service",
            "--model",
            args.model,
            "--engine",
            f"127.0.0.1:{args.engine_port}",
            "--port",
            str(args.tokenizer_port),
            *shlex.split(args.tokenizer_args),
        ],
    }
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: signals.append(signum))
    procs = {
        name: subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL) for name, cmd in commands.items()
    }
    log(
        f"engine pid {procs['engine'].pid} on :{args.engine_port}, "
        f"tokenizer pid {procs['tokenizer'].pid} on :{args.tokenizer_port}; Ctrl-C stops both"
    )
    stopping, failed, forwarded = False, False, 0

    def signal_all(sig: int) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(sig)

    while any(proc.poll() is None for proc in procs.values()):
        if len(signals) > forwarded:
            forwarded = len(signals)
            if not stopping:
                log(f"{signal.Signals(signals[-1]).name}: stopping both services (again to kill them)")
                stopping = True
                signal_all(signal.SIGTERM)
            else:
                log("second signal: killing the services")
                signal_all(signal.SIGKILL)
        for name, proc in procs.items():
            if not stopping and proc.poll() is not None:
                log(f"the {name} service exited with code {proc.returncode}; stopping the other")
                stopping, failed = True, True
                signal_all(signal.SIGTERM)
        time.sleep(0.1)
    codes = {name: proc.returncode for name, proc in procs.items()}
    # During a shutdown we asked for, exit 0 and death by our own SIGTERM (before its handlers were set) are clean.
    clean = all(code in (0, -signal.SIGTERM) for code in codes.values())
    if failed or not clean:
        log(f"stopped with exit codes {codes}")
        return 1
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
