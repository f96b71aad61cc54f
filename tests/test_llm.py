"""llm.py against a loopback endpoint: the request, retries, and what a slow, huge or redirecting endpoint
may cost (one deadline, a size cap, no request to another server), each failure one line."""
import socket
import time

import pytest

import llm
from cot import format_cot, parse_cot
from llm_server import GOOD, LoopbackLLM

KEY = "sk-test-8f3a1c5e9d"  # a fake API key that must never leave the Authorization header


def client(server, **kw):
    return llm.LLMClient(server.url, "test-model", **{"timeout": 0.2, "backoff": 0.01, "retries": 3, **kw})


def one_line_error(asker):
    """The message of the LLMError that asking `client` ends in: one line, starting with the server's URL."""
    with pytest.raises(llm.LLMError) as failure:
        asker.ask("a prompt")
    message = str(failure.value)
    assert "\n" not in message and message.startswith("http://127.0.0.1:")
    return message


def test_llm_ok_request_format():
    with LoopbackLLM() as server:
        text = client(server, api_key=KEY, temperature=0.3).ask("describe")
    assert text == format_cot(parse_cot(GOOD))
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"] == {"model": "test-model", "temperature": 0.3,
                               "messages": [{"role": "user", "content": "describe"}]}


@pytest.mark.parametrize("behaviour", ["500", "badjson", "slow", "missing"])
def test_llm_retries_then_succeeds(behaviour):
    with LoopbackLLM(script=[behaviour, behaviour], slow=0.6) as server:
        assert client(server).ask("describe") == format_cot(parse_cot(GOOD))
    assert len(server.requests) == 3


def test_llm_honours_retry_after():
    with LoopbackLLM(script=[("429", 0.4)]) as server:
        start = time.monotonic()
        client(server).ask("describe")
        assert time.monotonic() - start >= 0.4
    assert len(server.requests) == 2


def test_llm_gives_up_after_bounded_retries():
    with LoopbackLLM(script=["missing"] * 10) as server:
        with pytest.raises(llm.LLMError, match="no valid CoT after 4 attempts.*Boundary"):
            client(server, retries=3).ask("describe")
    assert len(server.requests) == 4


def test_llm_unreachable_server_is_retried_then_reported():
    with socket.socket() as s:          # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lonely = llm.LLMClient(f"http://127.0.0.1:{port}/v1", "test-model", timeout=0.2, backoff=0.01, retries=2)
    with pytest.raises(llm.LLMError, match="after 3 attempts; last: ConnectionError"):
        lonely.ask("describe")


def test_llm_client_error_fails_at_once():
    with LoopbackLLM(script=[("error", 400, "model 'nope'\nnot found")]) as server:
        message = one_line_error(client(server))
    assert message.endswith("/v1/chat/completions: HTTP 400: model 'nope' not found")
    assert len(server.requests) == 1


# ----------------------------------------------------------------------------- hostile endpoints

@pytest.mark.parametrize("behaviour", ["drip", "dripheaders"])
def test_a_dripping_endpoint_trips_the_whole_request_deadline(behaviour):
    """Every byte comes well within the timeout, the whole reply (several seconds) does not."""
    with LoopbackLLM(script=[(behaviour, 0.02)]) as server:
        start = time.monotonic()
        message = one_line_error(client(server, timeout=1.0, retries=0))
        elapsed = time.monotonic() - start
    assert message.endswith("no valid CoT after 1 attempts; last: no complete reply within 1 s")
    assert 1.0 <= elapsed < 2.0


def test_a_dripping_endpoint_is_retried_like_a_timeout():
    with LoopbackLLM(script=[("drip", 0.02)]) as server:
        assert client(server, timeout=0.5).ask("describe") == format_cot(parse_cot(GOOD))
    assert len(server.requests) == 2


@pytest.mark.parametrize("behaviour, cause", [
    (("huge", 3 * llm.MAX_REPLY), f"the reply runs over the {llm.MAX_REPLY} bytes accepted; refused"),
    (("claims", 10 ** 12), f"the reply would be {10 ** 12} bytes (Content-Length), over the {llm.MAX_REPLY} "
                           "accepted; refused unread")])
def test_a_huge_reply_is_refused_at_once(behaviour, cause):
    with LoopbackLLM(script=[behaviour]) as server:
        message = one_line_error(client(server, timeout=5.0))
    assert message == f"{server.url}/v1/chat/completions: {cause}"
    assert len(server.requests) == 1                                       # not retried


def test_a_redirect_to_another_server_is_refused_and_it_hears_nothing():
    with LoopbackLLM() as other:
        away = other.url + "/v1/chat/completions"
        with LoopbackLLM(script=[("redirect", away)]) as server:
            message = one_line_error(client(server, api_key=KEY))
        assert message == (f"{server.url}/v1/chat/completions: HTTP 307 redirects to another server "
                           f"({away}); not followed, the prompt goes to the configured server only")
        assert len(server.requests) == 1
        time.sleep(0.2)
        assert other.requests == []                                         # neither the prompt nor the key


def test_a_redirect_to_another_port_or_scheme_of_the_same_host_is_refused():
    assert llm.origin("http://127.0.0.1:8000/v1") == llm.origin("HTTP://127.0.0.1:8000/v2/chat")
    assert llm.origin("http://example.org/v1") == llm.origin("http://EXAMPLE.org:80/x")
    assert llm.origin("http://127.0.0.1:8000/") != llm.origin("http://127.0.0.1:8001/")
    assert llm.origin("https://example.org/") != llm.origin("http://example.org:443/")
    assert llm.origin("http://127.0.0.1:8000/") != llm.origin("http://127.0.0.2:8000/")


def test_a_redirect_on_the_same_server_is_followed():
    with LoopbackLLM(script=[("redirect", "/v2/chat/completions")]) as server:
        assert client(server, api_key=KEY).ask("a prompt") == format_cot(parse_cot(GOOD))
    first, second = server.requests
    assert (first["path"], second["path"]) == ("/v1/chat/completions", "/v2/chat/completions")
    assert second["body"] == first["body"] and second["headers"]["Authorization"] == f"Bearer {KEY}"


def test_endless_redirects_stop():
    with LoopbackLLM(script=[("redirect", "/v1/chat/completions")] * 20) as server:
        message = one_line_error(client(server))
    assert message.endswith(f"more than {llm.MAX_REDIRECTS} redirects")
    assert len(server.requests) == llm.MAX_REDIRECTS + 1
