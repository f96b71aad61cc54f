"""A loopback OpenAI-compatible chat server for the LLM and pool tests: scripted replies, bounded in count
and time.

    with LoopbackLLM(script=[("429", 0.3), "ok"], latency=0.0) as server:
        llm.LLMClient(server.url, "test-model").ask("...")
        server.requests   # what the client sent: path, headers, JSON body

Successive requests follow `script`, then "ok":
    "ok"                      a valid four-part CoT
    ("429", seconds)          too many requests, with Retry-After
    "500"                     server error
    "badjson"                 status 200 with a body that is not JSON
    "slow"                    a valid CoT after `slow` seconds (longer than the client's timeout)
    "missing"                 a completion whose text lacks the Boundary field
    ("error", code, message)  an OpenAI-style error body with that status
    ("drip", seconds)         a valid CoT sent one byte every `seconds` (each byte quick, the whole slow)
    ("dripheaders", seconds)  the status line and headers sent that way
    ("huge", size)            status 200 with `size` bytes and no Content-Length (closing ends the body)
    ("claims", size)          a valid CoT under a Content-Length of `size`
    ("redirect", location)    HTTP 307 to `location`
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

            def write(self, data, drip=0.0):
                """Write `data` at once, or one byte every `drip` seconds; a client that hung up ends it."""
                try:
                    for piece in [data[i:i + 1] for i in range(len(data))] if drip else [data]:
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(drip)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout and size tests)

            def send(self, status, body, headers=(), length=None, drip=0.0, drip_head=0.0):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                head = f"HTTP/1.0 {status} {self.responses.get(status, ('',))[0]}\r\n"
                for key, value in [*headers, ("Content-Type", "application/json")]:
                    head += f"{key}: {value}\r\n"
                if length != -1:  # -1: no Content-Length, the closed connection ends the body
                    head += f"Content-Length: {len(data) if length is None else length}\r\n"
                self.write((head + "\r\n").encode(), drip_head)
                self.write(data, drip)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                behaviour = owner.next_behaviour({"path": self.path, "headers": dict(self.headers),
                                                  "body": body})
                time.sleep(owner.latency)
                completion = lambda text: {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                                "content": text}}]}
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
                elif behaviour[0] == "drip":
                    self.send(200, completion(owner.reply), drip=behaviour[1])
                elif behaviour[0] == "dripheaders":
                    self.send(200, completion(owner.reply), [("X-Padding", "x" * 200)],
                              drip_head=behaviour[1])
                elif behaviour[0] == "huge":
                    self.send(200, b" " * behaviour[1], length=-1)
                elif behaviour[0] == "claims":
                    self.send(200, completion(owner.reply), length=behaviour[1])
                elif behaviour[0] == "redirect":
                    self.send(307, b"", [("Location", behaviour[1])])
                elif behaviour[0] == "429":
                    self.send(429, {"error": {"message": "slow down"}}, [("Retry-After", str(behaviour[1]))])
                else:
                    _, status, message = behaviour
                    self.send(status, {"error": {"message": message, "type": "invalid_request_error"}})

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
