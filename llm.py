"""The LLM back end's client: one OpenAI-compatible /v1/chat/completions endpoint (docs/design.md §5).

pool.py asks it for one chain of thought at a time. The endpoint is a remote party that may be slow, broken
or hostile, so what one request can cost is bounded:

    deadline   `timeout` seconds for the whole request (connect, headers, body, redirects); a watchdog shuts
               the socket when it passes, so a reply dripped byte by byte cannot hold a worker longer
    size       a reply of at most MAX_REPLY bytes, refused unread when its Content-Length says more
    redirects  followed only to the endpoint's own scheme, host and port: the prompt and the API key never
               go to another server
    retries    with a jittered exponential backoff (a Retry-After honoured), for what may pass only: no
               connection, the deadline, a broken transfer, HTTP 429 and 5xx, a reply that is not a valid CoT

Every failure is an LLMError of one line that names the URL and the cause, with the API key scrubbed.
"""
import base64
import itertools
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from config import CersError
from cot import format_cot, parse_cot

MAX_REPLY = 1 << 20                   # bytes; a chat completion holding one CoT is a few kB
MAX_REDIRECTS = 5                     # same-server redirects followed in one request
REDIRECTS = (301, 302, 303, 307, 308)  # each is followed with the same POST: the endpoint has moved


class LLMError(CersError, RuntimeError):
    """The endpoint refused, or gave no valid CoT within the retries; never holds the API key."""


class Retry(Exception):
    """A failure that may pass; LLMClient.ask tries again (never leaves this module)."""


def one_line(text, limit=300):
    return " ".join(str(text).split())[:limit]


def origin(url):
    """(scheme, host, port) of a URL, the port filled in from the scheme; what a redirect must keep."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a port that is not a number matches nothing
        port = -1
    return scheme, parts.hostname, port or {"http": 80, "https": 443}.get(scheme)


def server_message(reply):
    """The error message of an OpenAI-style error body, else the body's start."""
    try:
        error = json.loads(reply)["error"]
        return one_line(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return one_line(reply.decode("utf-8", "replace"))


def reply_text(reply):
    """The assistant's text of a chat completion body; ValueError when the body is not one."""
    try:
        content = json.loads(reply)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat completion ({type(e).__name__})") from None
    if isinstance(content, list):  # some servers send content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter that keeps the sockets it opens, so that shut() ends a read blocked in another thread:
    closing a response or a session does not wake a blocked read, shutting its socket does."""

    def __init__(self):
        self.sockets, self.is_shut = [], False
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        adapter = self

        def watched(pool_class):
            class Connection(pool_class.ConnectionCls):
                def connect(self):
                    super().connect()
                    adapter.sockets.append(self.sock)
                    if adapter.is_shut:  # connected just as the deadline passed
                        adapter.shut()
            return type(pool_class.__name__, (pool_class,), {"ConnectionCls": Connection})
        manager = self.poolmanager
        manager.pool_classes_by_scheme = {k: watched(c) for k, c in manager.pool_classes_by_scheme.items()}

    def shut(self):
        self.is_shut = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


@dataclass
class LLMClient:
    """An OpenAI-compatible chat-completions endpoint; safe to share between threads."""
    url: str                          # base URL, e.g. http://localhost:8000 or https://api.openai.com/v1
    model: str
    api_key: str = field(default="", repr=False)  # a bearer token; never printed, logged or stored
    temperature: float = 0.2
    timeout: float = 60.0             # seconds for a whole request: connect, headers, body, redirects
    retries: int = 5                  # extra attempts after transient failures (module docstring)
    backoff: float = 1.0              # seconds before the first retry; doubles each time, jittered
    max_wait: float = 60.0            # longest single wait, Retry-After included

    def endpoint(self):
        url = self.url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        return url + ("" if url.endswith("/v1") else "/v1") + "/chat/completions"

    def error(self, cause, url=None):
        """An LLMError of one line naming the URL and the cause, the API key scrubbed."""
        message = one_line(f"{url or self.endpoint()}: {cause}", 600)
        return LLMError(message.replace(self.api_key, "***") if self.api_key else message)

    def overdue(self):
        return Retry(f"no complete reply within {self.timeout:g} s")

    def ask(self, prompt, png=None):
        """The canonical CoT text for one prompt (with an optional PNG attached), or LLMError."""
        content = prompt
        if png is not None:  # the vision montage goes along as a data URL
            picture = {"url": "data:image/png;base64," + base64.b64encode(png).decode()}
            content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": picture}]
        body = {"model": self.model, "temperature": self.temperature,
                "messages": [{"role": "user", "content": content}]}
        headers = {"Accept-Encoding": "identity"}  # the size cap counts what arrives, not what it inflates to
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem, wait = "", 0.0
        for attempt in range(self.retries + 1):
            time.sleep(wait)
            # the jitter spreads clients that failed together
            wait = min(self.max_wait, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            try:
                status, reply_headers, reply = self.post(body, headers)
                if status == 429 or status >= 500:
                    try:
                        wait = max(0.0, min(float(reply_headers["Retry-After"]), self.max_wait))
                    except (KeyError, ValueError):
                        pass  # no Retry-After, or an HTTP date: keep the backoff
                    raise Retry(f"HTTP {status}: {server_message(reply)}")
                if not 200 <= status < 300:
                    raise self.error(f"HTTP {status}: {server_message(reply)}")
                return format_cot(parse_cot(reply_text(reply)))
            except Retry as e:
                problem = str(e)
            except requests.RequestException as e:  # a malformed URL, header or the like: no retry helps
                raise self.error(f"{type(e).__name__}: {e}") from None
            except ValueError as e:
                problem = f"invalid reply: {e}"
        raise self.error(f"no valid CoT after {self.retries + 1} attempts; last: {problem}")

    def post(self, body, headers):
        """One attempt: (status, headers, body) of the final reply to a POST of `body`, same-server redirects
        followed, all within `timeout` seconds. Raises Retry for what may pass, LLMError for the rest."""
        url = self.endpoint()
        deadline = time.monotonic() + self.timeout
        adapter, session = WatchedAdapter(), requests.Session()
        for prefix in ("http://", "https://"):
            session.mount(prefix, adapter)
        watchdog = threading.Timer(self.timeout, adapter.shut)
        watchdog.daemon = True
        watchdog.start()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                left = max(1e-3, deadline - time.monotonic())
                with session.post(url, json=body, headers=headers, timeout=left, stream=True,
                                  allow_redirects=False) as response:
                    if response.status_code not in REDIRECTS or "Location" not in response.headers:
                        return response.status_code, response.headers, self.read(response, url, deadline)
                    target = urljoin(url, response.headers["Location"])
                if origin(target) != origin(url):
                    raise self.error(f"HTTP {response.status_code} redirects to another server ({target}); "
                                     "not followed, the prompt goes to the configured server only", url)
                url = target
            raise self.error(f"more than {MAX_REDIRECTS} redirects")
        except requests.RequestException as e:
            if adapter.is_shut or isinstance(e, requests.Timeout):
                raise self.overdue() from None
            if isinstance(e, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
                raise Retry(f"{type(e).__name__} (is the server running?)") from None
            raise
        finally:
            watchdog.cancel()
            session.close()

    def read(self, response, url, deadline):
        """The body of a streamed reply, refused over MAX_REPLY bytes; the deadline is checked between chunks,
        the watchdog ends a read that blocks."""
        length = response.headers.get("Content-Length", "").strip()
        if length.isdigit() and int(length) > MAX_REPLY:
            raise self.error(f"the reply would be {int(length)} bytes (Content-Length), over the {MAX_REPLY} "
                             "accepted; refused unread", url)
        chunks, size = [], 0
        # the empty chunk at the end checks the deadline once more: a read the watchdog ended can look whole
        for chunk in itertools.chain(response.iter_content(16384), [b""]):
            if time.monotonic() > deadline:
                raise self.overdue()
            size += len(chunk)
            if size > MAX_REPLY:
                raise self.error(f"the reply runs over the {MAX_REPLY} bytes accepted; refused", url)
            chunks.append(chunk)
        return b"".join(chunks)
