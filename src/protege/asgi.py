"""Running an ASGI app (the proxy, `protege serve`) under uvicorn, the way protege runs them.

uvloop and httptools where installed, no access log, and a stop on SIGINT or SIGTERM that
returns to the caller, which then reports lost traces and picks the exit code.
"""

from __future__ import annotations


def run_asgi(app, host: str, port: int, log_level: str = "warning") -> None:
    """uvicorn with uvloop and httptools where installed, no access log: the proxy's and the server's loop."""
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    import signal

    config = uvicorn.Config(app, host=host, port=port, loop=loop, http="httptools", lifespan="on",
                            access_log=False, log_level=log_level, timeout_keep_alive=75)

    def stopped(signum, _frame):
        raise _Stopped(signum)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler
    # found before it started: ours, so the caller can still report lost traces and exit 0
    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    except (KeyboardInterrupt, _Stopped):  # a normal stop
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stopped(Exception):
    """The signal uvicorn re-raises after its graceful shutdown."""
