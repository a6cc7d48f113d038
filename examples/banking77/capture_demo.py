"""Demo of live capture: the openai client talks to `protege proxy`, which logs every call.

Run: python examples/banking77/capture_demo.py   (part of `make demo`)

No frontier API is reachable here, so the upstream is protege's scripted OpenAI-compatible
server on 127.0.0.1 (protege.testing), answering after a fixed 20 ms. Point
`protege proxy --upstream` at https://api.openai.com/v1 to log real traffic the same way.
"""

import gzip
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai

from protege.testing import ScriptedUpstream

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"proxy did not start on port {port}")


def main() -> None:
    with gzip.open(HERE / "gpt4_calls.jsonl.gz", "rt") as fh:
        examples = [json.loads(line) for i, line in enumerate(fh) if i % 154 == 0]  # 20 spread over the intents
    labels = {e["messages"][1]["content"]: e["messages"][2]["content"] for e in examples}
    upstream = ScriptedUpstream(delay_ms=20, model=None, reply=lambda req: labels.get(req["messages"][-1]["content"], "unknown"))
    upstream.start()
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "protege.cli", "proxy", "--upstream", upstream.url,
                              "--port", str(port)])
    try:
        wait_port(port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-demo-not-stored")
        for i, e in enumerate(examples):
            kwargs = dict(model="gpt-4", messages=e["messages"][:2],
                          extra_headers={"X-Protege-Task": "banking77-live"})
            if i % 2:
                stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
                answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                answer = client.chat.completions.create(**kwargs).choices[0].message.content
            print(f"  {e['messages'][1]['content'][:60]:60s} -> {answer}")
    finally:
        proxy.send_signal(signal.SIGINT)  # graceful stop: the writer flushes its queue
        proxy.wait(30)
        upstream.stop()
    subprocess.run([sys.executable, "-m", "protege.cli", "traces", "stats", "--task", "banking77-live"], check=True)


if __name__ == "__main__":
    main()
