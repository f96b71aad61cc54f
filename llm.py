"""The llm back end (docs/design.md §5): an OpenAI-compatible chat endpoint asked for a four-part CoT text,
and the parsing of its reply. The endpoint may be slow, broken or hostile: one deadline per request, a size
cap, same-server redirects only, bounded retries; the API key is never shown; control characters stripped."""
import base64
import contextlib
import io
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
from scipy import ndimage

from config import CersError

FIELDS = ("texture", "boundary", "context", "summary")
# a field heading at the start of a line; markdown (#, >, -, *, **bold**) and numbering ("1." "2)") allowed
HEADING = re.compile(r"^[ \t>#*\-]*(?:\d+[.)][ \t]*)?[*_]*[ \t]*(texture|boundary|context|summary)[ \t]*[*_]*"
                     r"[ \t]*[:：][*_]*", re.IGNORECASE | re.MULTILINE)
# what a terminal acts on: ANSI escape sequences, C0 controls but newline and tab, DEL, C1, bidi overrides
CONTROL = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?)?"
                     r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
RENDER_LOCK = threading.Lock()         # matplotlib is not thread-safe; montages are drawn one at a time
MAX_REPLY = 1 << 20                    # bytes; a chat completion holding one CoT is a few kB
MAX_REDIRECTS = 5                      # same-server redirects followed in one request
REDIRECTS = (301, 302, 303, 307, 308)  # each is followed with the same POST: the endpoint has moved


def clean(text):
    """`text` without control characters or escape sequences: what a server sent never acts on a terminal."""
    return CONTROL.sub("", str(text))


def one_line(text, limit=300):
    """`text` cleaned, on one line, at most `limit` characters: how a message quotes what it was sent."""
    return " ".join(clean(text).split())[:limit]


def parse_cot(text):
    """The four fields {texture, boundary, context, summary} of a reply; ValueError when one is missing.
    Tolerates a preamble, markdown, numbering, any order, extra whitespace and a reasoning model's <think>
    scratchpad; after the last field, text beyond a blank line (closing chatter) is dropped."""
    text = re.sub(r"<think>.*?</think>", "", clean(text), flags=re.DOTALL)
    heads, found = list(HEADING.finditer(text)), {}
    for head, following in zip(heads, heads[1:] + [None]):
        body = text[head.end():following.start() if following else len(text)]
        if following is None:
            body = re.split(r"\n[ \t]*\n", body.strip(), maxsplit=1)[0]
        found.setdefault(head.group(1).lower(), " ".join(body.replace("**", "").split()))
    missing = [f.capitalize() for f in FIELDS if not re.search(r"\w", found.get(f, ""))]
    if missing:
        raise ValueError(f"CoT reply lacks {', '.join(missing)}: {one_line(text, 120)!r}")
    return {f: found[f] for f in FIELDS}


def format_cot(fields):
    """The canonical four-line text that is cached and indexed by BM25."""
    return "\n".join(f"{f.capitalize()}: {fields[f]}" for f in FIELDS)


def montage_png(image, mask=None):
    """PNG bytes of four slices (three axial, one coronal) through the target outlined in red, or without a
    mask through the volume centre; drawn on an Agg canvas, so the pyplot backend is never touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    x = np.asarray(image, dtype=np.float32)
    m = None if mask is None or not np.any(mask) else np.asarray(mask).astype(bool, copy=False)
    if m is not None:
        zs = np.flatnonzero(m.any((0, 1)))
        low, high, yc = zs[0], zs[-1], int(round(ndimage.center_of_mass(m)[1]))
    else:
        low, high, yc = x.shape[2] // 4, 3 * x.shape[2] // 4, x.shape[1] // 2
    cuts = [np.s_[:, :, z] for z in np.linspace(low, high, 5)[1:4].round().astype(int)] + [np.s_[:, yc, :]]
    vmin, vmax = np.percentile(x, [1, 99])
    with RENDER_LOCK:
        fig = Figure(figsize=(6, 6), dpi=96)
        FigureCanvasAgg(fig)
        for ax, cut in zip(fig.subplots(2, 2).ravel(), cuts):
            ax.imshow(x[cut].T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
            if m is not None and m[cut].any():
                ax.contour(m[cut].T, levels=[0.5], colors="red", linewidths=1)
            ax.axis("off")
        fig.subplots_adjust(0, 0, 1, 1, 0.02, 0.02)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    return buf.getvalue()


class LLMError(CersError, RuntimeError):
    """The endpoint refused, or gave no valid CoT within the retries; one line, never the API key."""


class RateLimited(LLMError):
    """The endpoint asks for a longer pause than the client waits: the whole build stops."""


class Retry(Exception):
    """A failure that may pass; LLMClient.ask tries again."""


def origin(url):
    """(scheme, host, port) of a URL, the port filled in from the scheme: what a redirect must keep."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number matches nothing
        port = -1
    return parts.scheme.lower(), parts.hostname, port


def server_message(reply):
    """The message of an OpenAI-style error body, else the body's start."""
    try:
        error = json.loads(reply)["error"]
        return one_line(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return one_line(reply.decode("utf-8", "replace"))


def reply_text(reply):
    """The assistant's text of a chat completion; ValueError when there is none or it was cut at the token
    limit (no whole CoT, even when its four headings made it in)."""
    try:
        choice = json.loads(reply)["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat completion ({type(e).__name__})") from None
    if choice.get("finish_reason") == "length":
        raise ValueError("the reply was cut at the token limit (finish_reason 'length')")
    if isinstance(content, list):  # some servers send content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose shut() shuts its sockets down, waking reads blocked in other threads."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.sockets, self.is_shut, adapter = [], False, self

        class Watched:  # mixed into each connection class: keeps its socket, shut at once after shut()
            def connect(self):
                super().connect()
                adapter.sockets.append(self.sock)
                if adapter.is_shut:
                    adapter.shut()
        self.poolmanager.pool_classes_by_scheme = {
            k: type(c.__name__, (c,), {"ConnectionCls": type("Conn", (Watched, c.ConnectionCls), {})})
            for k, c in self.poolmanager.pool_classes_by_scheme.items()}

    def shut(self):
        self.is_shut = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)


@dataclass
class LLMClient:
    """An OpenAI-compatible chat-completions endpoint; safe to share between threads."""
    url: str                          # base URL, e.g. http://localhost:8000 or https://api.openai.com/v1
    model: str
    api_key: str = field(default="", repr=False)  # a bearer token; never printed, logged or stored
    temperature: float = 0.2
    timeout: float = 60.0             # seconds for a whole request: connect, headers, body, redirects
    retries: int = 5                  # extra attempts after failures that may pass
    backoff: float = 1.0              # seconds before the first retry; doubles each time, jittered
    max_wait: float = 60.0            # longest single wait; a longer Retry-After stops the build

    def endpoint(self):
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url.removesuffix("/v1") + "/v1/chat/completions"

    def error(self, cause, url=None, kind=LLMError):
        """An error of one line naming the URL and the cause, control characters and the API key removed."""
        message = one_line(f"{url or self.endpoint()}: {cause}", 600)
        return kind(message.replace(self.api_key, "***") if self.api_key else message)

    def ask(self, prompt, png=None):
        """The canonical CoT text for one prompt (with an optional PNG attached), or LLMError. Retried with a
        jittered exponential backoff (a short Retry-After honoured) for what may pass only: no connection, the
        deadline, a broken transfer, HTTP 429 and 5xx, a reply that is not a whole CoT."""
        if png is not None:  # the vision montage goes along as a data URL
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            prompt = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
        body = {"model": self.model, "temperature": self.temperature,
                "messages": [{"role": "user", "content": prompt}]}
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        headers = {"Accept-Encoding": "identity", **auth}  # the size cap counts what arrives, not inflated
        problem, wait = "", 0.0
        for attempt in range(self.retries + 1):
            time.sleep(wait)
            wait = min(self.max_wait, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
            try:
                status, reply_headers, reply = self.post(body, headers)
                if status == 429 or status >= 500:
                    try:
                        asked = float(reply_headers.get("Retry-After", "nan"))  # nan: keep the backoff
                    except ValueError:
                        asked = float("nan")  # an HTTP date
                    if asked > self.max_wait:
                        raise self.error(f"HTTP {status} ({server_message(reply)}): rate limited, the server "
                                         f"asks to wait {asked:g} s, over the {self.max_wait:g} s this "
                                         "client waits; stopped, finished texts are cached: re-run later",
                                         None, RateLimited)
                    wait = asked if asked >= 0 else wait
                    raise Retry(f"HTTP {status}: {server_message(reply)}")
                if not 200 <= status < 300:
                    raise self.error(f"HTTP {status}: {server_message(reply)}")
                return format_cot(parse_cot(reply_text(reply)))
            except Retry as e:
                problem = str(e)
            except ValueError as e:
                problem = f"invalid reply: {e}"
        raise self.error(f"no valid CoT after {self.retries + 1} attempts; last: {problem}")

    def post(self, body, headers):
        """(status, headers, body) of the final reply to one POST, same-server redirects followed, all within
        `timeout` seconds (a watchdog shuts the sockets then); Retry for what may pass, LLMError else."""
        url, deadline = self.endpoint(), time.monotonic() + self.timeout
        late = f"no complete reply within {self.timeout:g} s"
        adapter, session = WatchedAdapter(), requests.Session()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        watchdog = threading.Timer(self.timeout, adapter.shut)
        watchdog.daemon = True
        watchdog.start()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                left = max(1e-3, deadline - time.monotonic())
                with session.post(url, json=body, headers=headers, timeout=left, stream=True,
                                  allow_redirects=False) as response:
                    if response.status_code not in REDIRECTS or "Location" not in response.headers:
                        reply = self.read(response, url)
                        if time.monotonic() > deadline:  # a read the watchdog ended can look whole
                            raise Retry(late)
                        return response.status_code, response.headers, reply
                    target = urljoin(url, response.headers["Location"])
                if origin(target) != origin(url):
                    raise self.error(f"HTTP {response.status_code} redirects to another server ({target}); "
                                     "not followed, the prompt goes to the configured server only", url)
                url = target
            raise self.error(f"more than {MAX_REDIRECTS} redirects")
        except requests.RequestException as e:
            if adapter.is_shut or isinstance(e, requests.Timeout):
                raise Retry(late) from None
            if isinstance(e, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
                raise Retry(f"{type(e).__name__} (is the server running?)") from None
            raise self.error(f"{type(e).__name__}: {e}") from None  # a malformed URL or the like: no retry
        finally:
            watchdog.cancel()
            session.close()

    def read(self, response, url):
        """The body of a streamed reply, refused over MAX_REPLY bytes (unread when Content-Length says so)."""
        length = response.headers.get("Content-Length", "").strip()
        if length.isdigit() and int(length) > MAX_REPLY:
            raise self.error(f"the reply would be {int(length)} bytes (Content-Length), over the {MAX_REPLY} "
                             "accepted; refused unread", url)
        body = bytearray()
        for chunk in response.iter_content(16384):
            body += chunk
            if len(body) > MAX_REPLY:
                raise self.error(f"the reply runs over the {MAX_REPLY} bytes accepted; refused", url)
        return bytes(body)
