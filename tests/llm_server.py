"""A loopback OpenAI-compatible chat server for the pool tests: scripted replies, bounded in count and time.

    with LoopbackLLM(script=[("429", 0.3), "ok"], latency=0.0) as server:
        LLMClient(server.url, "test-model").ask("...")
        server.requests   # what the client sent: path, headers, JSON body

Successive requests follow `script`, then "ok":
    "ok"                      a valid four-part CoT
    ("429", seconds)          too many requests, with Retry-After
    "500"                     server error
    "badjson"                 status 200 with a body that is not JSON
    "slow"                    a valid CoT after `slow` seconds (longer than the client's timeout)
    "missing"                 a completion whose text lacks the Boundary field
    ("error", code, message)  an OpenAI-style error body with that status
It listens on 127.0.0.1 only, answers at most `max_requests` requests (503 after that) and shuts
itself down after `lifetime` seconds.
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

            def send(self, status, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    for key, value in headers:
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                behaviour = owner.next_behaviour({"path": self.path, "headers": dict(self.headers), "body": body})
                time.sleep(owner.latency)
                completion = lambda text: {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                if behaviour == "ok":
                    self.send(200, completion(owner.reply))
                elif behaviour == "slow":
                    time.sleep(owner.slow)
                    self.send(200, completion(owner.reply))
                elif behaviour == "missing":
                    self.send(200, completion(MISSING))
                elif behaviour == "badjson":
                    self.send(200, b"<html>gateway says hello</html>")
                elif behaviour == "500":
                    self.send(500, {"error": {"message": "internal error"}})
                elif behaviour[0] == "429":
                    self.send(429, {"error": {"message": "slow down"}}, [("Retry-After", str(behaviour[1]))])
                else:
                    _, status, message = behaviour
                    self.send(status, {"error": {"message": message, "type": "invalid_request_error"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
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
