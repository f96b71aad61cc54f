"""A loopback OpenAI-compatible chat server for the pool tests: scripted replies, bounded in count and time.

    with LoopbackLLM(script=[("wait", 429, 0.3), "ok"]) as server:
        llm.LLMClient(server.url, "test-model").ask("...")
        server.requests   # what the client sent: path, headers, JSON body

Successive requests follow `script`, then "ok" (a valid CoT, the `reply` text). "slow": that after `slow`
s; "missing": a text without Boundary; "cut": cut at the token limit; "badjson": a body that is not JSON;
"500": a server error; ("wait", status, s): that status with a Retry-After; ("error", status, message): an
OpenAI-style error; ("drip", s) / ("dripheaders", s): the body / the headers one byte every s seconds;
("huge", size): size bytes without Content-Length; ("claims", size): a valid CoT under a Content-Length of
size; ("redirect", location): HTTP 307. It listens on 127.0.0.1, answers at most `max_requests` (503 after)
and lives `lifetime` s.
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOD = ("Texture: Mildly heterogeneous bright blood pool with low noise.\n"
        "Boundary: Sharp margins except where the pulmonary veins join.\n"
        "Context: The appendage and aortic root have similar brightness.\n"
        "Summary: Clear atrium whose vein junctions are the main difficulty.")
MISSING = "Texture: Homogeneous signal.\nContext: Bright neighbours.\nSummary: Hard case."


class LoopbackLLM:
    def __init__(self, script=(), latency=0.0, slow=1.0, reply=GOOD, max_requests=500, lifetime=120.0):
        self.script, self.latency, self.slow, self.reply = list(script), latency, slow, reply
        self.max_requests, self.lifetime = max_requests, lifetime
        self.requests, self.lock = [], threading.Lock()

    def next_behaviour(self, request):
        """Record a request and pick how to answer it."""
        with self.lock:
            self.requests.append(request)
            if len(self.requests) > self.max_requests:
                return ("error", 503, "loopback server: request limit reached")
            return self.script.pop(0) if self.script else "ok"

    def __enter__(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # seconds a handler waits on a silent client

            def log_message(self, *args):
                pass

            def send(self, status, body, headers=(), length=None, drip=0.0, drip_head=0.0):
                """The reply; head and body each at once, or one byte every `drip_head` / `drip` seconds.
                length -1: no Content-Length, the closed connection ends the body."""
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                head = f"HTTP/1.0 {status} {self.responses.get(status, ('',))[0]}\r\n"
                for key, value in [*headers, ("Content-Type", "application/json")]:
                    head += f"{key}: {value}\r\n"
                if length != -1:
                    head += f"Content-Length: {len(data) if length is None else length}\r\n"
                try:
                    for part, every in ((head.encode() + b"\r\n", drip_head), (data, drip)):
                        for piece in [part[i:i + 1] for i in range(len(part))] if every else [part]:
                            self.wfile.write(piece)
                            self.wfile.flush()
                            time.sleep(every)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout and size tests)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                how = owner.next_behaviour({"path": self.path, "headers": dict(self.headers), "body": body})
                name, *arg = (how,) if isinstance(how, str) else how
                time.sleep(owner.latency + (owner.slow if name == "slow" else 0.0))
                text = {"missing": MISSING, "cut": owner.reply[:-25]}.get(name, owner.reply)
                done = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "length" if name == "cut" else "stop"}]}
                if name == "badjson":
                    self.send(200, b"<html>gateway says hello</html>")
                elif name == "500":
                    self.send(500, {"error": {"message": "internal error"}})
                elif name == "wait":
                    self.send(arg[0], {"error": {"message": "slow down"}}, [("Retry-After", str(arg[1]))])
                elif name == "error":
                    self.send(arg[0], {"error": {"message": arg[1], "type": "invalid_request_error"}})
                elif name == "huge":
                    self.send(200, b" " * arg[0], length=-1)
                elif name == "redirect":
                    self.send(307, b"", [("Location", arg[0])])
                elif name == "dripheaders":
                    self.send(200, done, [("X-Padding", "x" * 200)], drip_head=arg[0])
                else:  # ok, slow, missing, cut, drip, claims
                    self.send(200, done, length=arg[0] if name == "claims" else None,
                              drip=arg[0] if name == "drip" else 0.0)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.deadline = threading.Timer(self.lifetime, self.server.shutdown)
        self.deadline.daemon = True
        self.deadline.start()
        return self

    def __exit__(self, *exc):
        self.deadline.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
