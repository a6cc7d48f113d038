"""protege: capture LLM traces, build a specialist, and decide in numbers whether to train it.

The few things a Python user calls:

    from protege import wrap, Store, TraceRecord
    client = wrap(openai.OpenAI(), task="intent")   # every call is stored as a trace
"""

from .errors import ProtegeError

__version__ = "0.1.0"
__all__ = ["ProtegeError", "Store", "TraceRecord", "wrap"]


def __getattr__(name):  # lazy: `import protege` stays cheap (no SQLAlchemy until needed)
    if name == "Store":
        from .traces.store import Store

        return Store
    if name == "TraceRecord":
        from .traces.record import TraceRecord

        return TraceRecord
    if name == "wrap":
        from .capture.sdk import wrap

        return wrap
    raise AttributeError(name)
