"""pool.py: four-part texts, prompts, image statistics, descriptors, the LLM client against a loopback server
(deadline, size cap, redirects, retries, rate limits, hostile replies, API key) and the CoT cache."""
import base64
import csv
import io
import json
import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

import llm
import pool
from config import CersError, ConfigError, get_config
from conftest import ROOT, finish, spawn, wait_for
from llm_server import GOOD, LoopbackLLM

KEY = "sk-test-8f3a1c5e9d"  # a fake API key that must never leave the Authorization header
CONTEXT = {"modality": "MRI", "anatomy": "heart", "target": "left atrium"}
CLEAN = llm.format_cot(llm.parse_cot(GOOD))
# a child process building the CoTs of N image jobs against URL into CACHE: python -c CHILD URL CACHE N
CHILD = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import llm, test_pool\n"
         "texts = test_pool.build(test_pool.image_jobs(int(sys.argv[3])), sys.argv[2], "
         "llm.LLMClient(sys.argv[1], 'test-model', timeout=5))\nprint('built', texts.cached, texts.new)\n")


def client(server, **kw):
    return llm.LLMClient(server.url, "test-model", **{"timeout": 0.2, "backoff": 0.01, "retries": 3, **kw})


def build(jobs, path, asker=None, **kw):
    return pool.build_cots(jobs, pool.CotCache(path), CONTEXT, asker, progress=False, **kw)


def image_jobs(n, shape=(16, 16, 8)):
    return [pool.Job(f"case{i:02d}", np.random.default_rng(i).normal(size=shape).astype(np.float32))
            for i in range(n)]


def toy_case(seed=0, shape=(48, 48, 32), blur=0.0):
    """A small volume: bright target ball, a bright look-alike tube touching it, darker tissue, noise."""
    def ball(centre, r):
        return sum((g - c) ** 2 for g, c in zip(np.indices(shape), centre)) <= r ** 2
    target, tube = ball((20, 24, 16), 8), np.zeros(shape, bool)
    tube[27:40, 21:27, 13:19] = True
    image = np.where(ball((24, 24, 16), 22), 1.0, 0.0) + 2.0 * (target | tube)
    image = ndimage.gaussian_filter(image, blur) if blur else image
    noise = np.random.default_rng(seed).normal(0, 0.15, shape)
    return (image + noise).astype(np.float32), target.astype(np.uint8)


def one_line_error(asker):  # the message of the LLMError that asking ends in: one line, from the server's URL
    with pytest.raises(llm.LLMError) as failure:
        asker.ask("a prompt")
    message = str(failure.value)
    assert "\n" not in message and message.startswith("http://127.0.0.1:")
    return message


def test_parse_real_replies_and_markdown_and_chatter_and_reject_a_missing_field(brisc_csv):
    with open(brisc_csv, newline="", encoding="utf-8") as f:
        texts = [row[k] for row in csv.DictReader(f) for k in ("cot_mask", "cot_no_mask")]
    assert len(texts) >= 100
    for text in texts:
        fields = llm.parse_cot(text)
        assert all(len(v) > 10 for v in fields.values()) and llm.parse_cot(llm.format_cot(fields)) == fields
    first = llm.parse_cot(texts[0])
    assert first["texture"].startswith("Heterogeneous") and first["summary"].endswith("challenging.")
    text = ("Sure! Here is the analysis.\n\n1. **Texture:** Bright,  uniform\n   blood pool.\n"
            "2. **Boundary**: Sharp rim.\n### context: Veins nearby.\n- SUMMARY： Easy case.\n\nBye.")
    assert llm.parse_cot(text) == {"texture": "Bright, uniform blood pool.", "boundary": "Sharp rim.",
                                    "context": "Veins nearby.", "summary": "Easy case."}
    assert llm.parse_cot("<think>Texture: draft</think>" + GOOD) == llm.parse_cot(GOOD)
    for bad in ["", "Texture: a\nBoundary: b\nContext: c",                 # a field missing
                "Texture: a\nBoundary: **  **\nContext: c\nSummary: d",   # a field empty
                "The texture: is bright and the boundary: is sharp.", None]:  # no headings
        with pytest.raises(ValueError):
            llm.parse_cot(bad)


def test_templates_render_and_hash_and_refuse_an_unknown_placeholder(tmp_path):
    values = {**CONTEXT, "descriptors": "- contrast: 3"}
    for kind in pool.KINDS:
        template = pool.load_template(kind)
        prompt = pool.render_prompt(template, values)
        assert "{" not in prompt and "left atrium" in prompt and "- contrast: 3" in prompt
        assert all(f"{f.capitalize()}:" in prompt for f in llm.FIELDS) and "128 tokens" in prompt
        changed = [pool.prompt_hash(template, CONTEXT, True), pool.prompt_hash(template + " ", CONTEXT),
                   pool.prompt_hash(template, {**CONTEXT, "target": "left ventricle"})]
        assert pool.prompt_hash(template, CONTEXT) not in changed

    (tmp_path / "cot_mask.txt").write_text("The {modality} of {organ}.")    # a user's template with a typo
    with pytest.raises(CersError) as failure:
        pool.build_cots(image_jobs(1), pool.CotCache(tmp_path / "c.jsonl"), CONTEXT, prompt_dir=tmp_path)
    assert str(failure.value) == (f"{tmp_path / 'cot_mask.txt'}: unknown placeholder {{organ}}; a prompt "
                                  "template may use {modality}, {anatomy}, {target}, {descriptors}")


def test_image_stats_and_the_descriptor_writer_follow_the_image(tmp_path, monkeypatch):
    (sharp_image, mask), (blurred_image, _) = toy_case(), toy_case(blur=1.5)
    sharp, blurred = pool.image_stats(sharp_image, mask), pool.image_stats(blurred_image, mask)
    assert sharp == pool.image_stats(sharp_image, mask)                  # deterministic
    assert sharp["boundary_sharpness"] > blurred["boundary_sharpness"]
    assert sharp["edge_sharpness"] > blurred["edge_sharpness"]
    assert sharp["lookalike_contact"] > 0 and 0 < sharp["lookalike_share"] < 1  # the tube touches the target
    assert sharp["target_components"] == 1
    only_image = pool.image_stats(sharp_image)
    assert "lookalike_share" not in only_image and only_image["bright_structures"] == 1  # ball + tube merge
    flat = pool.image_stats(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8))
    assert all(np.isfinite(v) for v in flat.values())
    stats = sharp
    for kind in pool.KINDS:
        text = pool.write_cot(stats, kind, **CONTEXT)
        assert text == pool.write_cot(stats, kind, **CONTEXT) and llm.parse_cot(text)  # deterministic
        assert 60 <= len(text.split()) <= 120 and not any(c.isdigit() for c in text)  # ~128 tokens, no digit
        assert "pulmonary veins" in text                                   # LA vocabulary
    cuts = pool.descriptor_words()["wording"]
    low = {k: lo - 1 for k, ((lo, hi), _) in cuts.items()}
    high = {k: hi + 1 for k, ((lo, hi), _) in cuts.items()}
    blurred, sharp = (llm.parse_cot(pool.write_cot({**stats, **s}, "mask", **CONTEXT)) for s in (low, high))
    assert blurred["boundary"].startswith("Blurred") and sharp["boundary"].startswith("Sharp")
    assert "Markedly heterogeneous" in sharp["texture"] and "Homogeneous" in blurred["texture"]
    assert blurred["summary"].endswith("is weak contrast with its surroundings and blurred margins.")
    other = pool.write_cot(stats, "image", "CT", "abdomen", "liver")
    assert "adjacent abdomen structures" in other and "pulmonary" not in other
    pool.descriptor_words.cache_clear()                                 # an edit of the wording that broke it
    monkeypatch.setattr(pool, "DESCRIPTORS", tmp_path / "descriptors.json")
    (tmp_path / "descriptors.json").write_text('{"wording": ')
    with pytest.raises(CersError, match=r"descriptors.json: not valid JSON \(Expecting value: line 1"):
        pool.write_cot(stats, "mask", **CONTEXT)


@pytest.mark.parametrize("behaviour", ["500", "badjson", "slow", "missing", "cut", ("wait", 503, 0),
                                       ("drip", 0.02)])  # a dripping reply is retried like a timeout
def test_llm_retries_then_succeeds(behaviour):
    with LoopbackLLM(script=[behaviour, behaviour], slow=0.6) as server:
        assert client(server).ask("describe") == CLEAN
    assert len(server.requests) == 3


def test_llm_gives_up_after_bounded_retries():
    for behaviour, cause in [("missing", "lacks Boundary"), ("cut", "cut at the token limit")]:
        with LoopbackLLM(script=[behaviour] * 10) as server:
            message = one_line_error(client(server, retries=3))
        assert "no valid CoT after 4 attempts; last: invalid reply: " in message and cause in message
        assert len(server.requests) == 4
    with socket.socket() as s:                                            # nothing listens on this port
        s.bind(("127.0.0.1", 0))
        asker = client(SimpleNamespace(url=f"http://127.0.0.1:{s.getsockname()[1]}/v1"), retries=2)
    assert "no valid CoT after 3 attempts; last: ConnectionError" in one_line_error(asker)


@pytest.mark.parametrize("status", [429, 503])
def test_a_short_retry_after_is_honoured_and_a_long_one_stops_the_build_at_once(tmp_path, status):
    path = tmp_path / "cache.jsonl"
    with LoopbackLLM(script=[("wait", status, 0.4), "ok", ("wait", status, 3600)]) as server:
        start = time.monotonic()
        with pytest.raises(llm.RateLimited) as failure:
            build(image_jobs(4), path, client(server))
        assert 0.4 <= time.monotonic() - start < 5 and len(server.requests) == 3  # then no sleep, no request
    assert str(failure.value) == (f"{server.url}/v1/chat/completions: HTTP {status} (slow down): rate "
                                  "limited, the server asks to wait 3600 s, over the 60 s this client waits; "
                                  "stopped, finished texts are cached: re-run later")
    assert len(pool.CotCache(path).records) == 1


@pytest.mark.parametrize("behaviour", ["drip", "dripheaders"])
def test_a_dripping_endpoint_trips_the_whole_request_deadline(behaviour):
    with LoopbackLLM(script=[(behaviour, 0.02)]) as server:  # each byte in time, the whole reply not
        start = time.monotonic()
        message = one_line_error(client(server, timeout=1.0, retries=0))
        assert 1.0 <= time.monotonic() - start < 2.0
    assert message.endswith("no valid CoT after 1 attempts; last: no complete reply within 1 s")


def test_request_format_and_redirects_to_the_same_server_only():
    with LoopbackLLM() as other:
        away = other.url + "/v1/chat/completions"
        with LoopbackLLM(script=[("redirect", away)]) as server:
            message = one_line_error(client(server, api_key=KEY))
        assert message == (f"{server.url}/v1/chat/completions: HTTP 307 redirects to another server "
                           f"({away}); not followed, the prompt goes to the configured server only")
        time.sleep(0.2)
        assert len(server.requests) == 1 and other.requests == []          # neither the prompt nor the key
    with LoopbackLLM(script=[("redirect", "/v2/chat/completions")]) as server:  # the request, moved once
        assert client(server, api_key=KEY, temperature=0.3).ask("describe") == CLEAN
    first, second = server.requests
    assert (first["path"], second["path"]) == ("/v1/chat/completions", "/v2/chat/completions")
    assert first["body"] == second["body"] == {"model": "test-model", "temperature": 0.3,
                                               "messages": [{"role": "user", "content": "describe"}]}
    assert first["headers"]["Authorization"] == second["headers"]["Authorization"] == f"Bearer {KEY}"
    with LoopbackLLM(script=[("redirect", "/v1/chat/completions")] * 20) as server:
        assert one_line_error(client(server)).endswith(f"more than {llm.MAX_REDIRECTS} redirects")
    assert len(server.requests) == llm.MAX_REDIRECTS + 1
    assert llm.origin("http://127.0.0.1:8000/v1") == llm.origin("HTTP://127.0.0.1:8000/v2/chat")
    assert llm.origin("http://example.org/v1") == llm.origin("http://EXAMPLE.org:80/x")
    others = ["https://example.org/", "http://example.org:444/", "http://example.net:443/"]
    assert all(llm.origin(url) != llm.origin("http://example.org:443/") for url in others)


def test_vision_sends_a_png_with_the_mask_outlined_only_when_given(tmp_path):
    import matplotlib.image
    image, mask = toy_case()
    jobs = [pool.Job("a", image, mask), pool.Job("a", image)]          # a mask CoT, an image-only CoT
    with LoopbackLLM() as server:
        build(jobs, tmp_path / "cache.jsonl", client(server), vision=True)
    assert len(server.requests) == 2
    for request in server.requests:
        text, picture = request["body"]["messages"][0]["content"]
        prefix, data = picture["image_url"]["url"].split(",", 1)
        assert (text["type"], picture["type"], prefix) == ("text", "image_url", "data:image/png;base64")
        rgb = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3]
        red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
        assert red.any() == ("reference segmentation mask" in text["text"])


def test_cache_keys_by_content_prompt_model_and_back_end(tmp_path):
    path, jobs = tmp_path / "cache.jsonl", image_jobs(3)
    with LoopbackLLM() as server:
        first, again = build(jobs, path, client(server)), build(jobs, path, client(server))
        assert (first.new, again.new, again.cached, len(server.requests)) == (3, 0, 3, 3)  # nothing twice
        assert {tuple(sorted(json.loads(line))) for line in path.read_text().splitlines()} == {
            ("backend", "case_id", "content_hash", "created", "kind", "model", "prompt_hash", "text")}
        assert build([pool.Job("case00", jobs[0].image + 1)], path, client(server)).new == 1  # a changed case
        assert build(jobs, path, llm.LLMClient(server.url, "other-model", timeout=0.2)).new == 3
        for kind, name in pool.TEMPLATES.items():
            (tmp_path / name).write_text(pool.load_template(kind) + "\nBe brief.")
        assert build(jobs, path, client(server), prompt_dir=tmp_path).new == 3 and len(server.requests) == 10
        descriptors = build(jobs, path)
    assert descriptors.new == 3 and set(descriptors.image.values()).isdisjoint(again.image.values())


def test_damaged_records_are_skipped_with_one_warning_and_asked_again(tmp_path):
    path, jobs = tmp_path / "cache.jsonl", image_jobs(8)
    build(jobs, path)
    good = [json.loads(line) for line in path.read_text().splitlines()]
    wrong = [{**good[0], "text": 42}, {k: v for k, v in good[1].items() if k != "content_hash"},
             {**good[2], "kind": ["image"]}, {**good[3], "case_id": None}, {**good[4], "kind": "sketch"},
             {**good[5], "text": ""}, [good[6]], good[7]["text"]]        # the last two are not even dicts
    torn = json.dumps(good[0])[:40]                                      # a crash mid-write, at the end
    path.write_text("".join(json.dumps(r) + "\n" for r in wrong) + json.dumps(good[7]) + "\n" + torn)
    with pytest.warns(Warning) as caught:
        again = build(jobs, path)
        assert len(pool.CotCache(path).records) == 8                     # the records after the torn line
    assert [str(w.message) for w in caught] == 2 * [
        f"{path}:1: skipping 9 damaged cache record(s) (line 1, 2, 3, 4, 5, ...; an interrupted write or an "
        "edit?); their texts are asked for again"]
    assert (again.cached, again.new) == (1, 7) and again.image == {r["case_id"]: r["text"] for r in good}


def test_failed_texts_are_reported_not_cached_and_asked_again(tmp_path):
    path = tmp_path / "cache.jsonl"  # a huge reply, a false Content-Length: refused at once; a part missing
    with LoopbackLLM(script=[("huge", 2 * llm.MAX_REPLY), ("claims", 10 ** 12), *4 * ["missing"]]) as server:
        texts = build(image_jobs(4), path, client(server, timeout=5))
        assert (texts.new, len(texts.failed), len(server.requests)) == (1, 3, 7)   # huge, claims: no retry
        reasons = sorted(r.split(": ", 1)[1] for r in texts.failed.values())
        assert reasons[0].startswith("no valid CoT after 4 attempts; last: invalid reply: CoT reply lacks")
        assert reasons[1:] == [f"the reply runs over the {llm.MAX_REPLY} bytes accepted; refused",
                               f"the reply would be {10 ** 12} bytes (Content-Length), over the "
                               f"{llm.MAX_REPLY} accepted; refused unread"]
        assert len(path.read_text().splitlines()) == 1 and list(texts.image) == ["case03"]
        retry = build(image_jobs(4), path, client(server))
        assert (retry.cached, retry.new, len(server.requests)) == (1, 3, 10)


def test_a_failed_cache_write_is_one_line_and_keeps_every_record(tmp_path):
    path = tmp_path / "cache.jsonl"  # the file-size limit cuts the next record short
    build(image_jobs(2), path)
    before = path.read_bytes()
    script = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import config, test_pool\n"
              f"sys.exit(config.cli(lambda argv: test_pool.build(test_pool.image_jobs(4), {str(path)!r})))\n")
    status, last = finish(spawn(["-c", script], tmp_path, file_limit=len(before) + 100), tmp_path)
    assert status == 2 and (tmp_path / "stdout.txt").read_text() == ""
    assert last == (f"error: {path}: cannot add a CoT text to the cache (File too large); the 2 texts "
                    "cached so far are kept; re-run")
    assert path.read_bytes() == before                                  # no partial record left behind


def test_killed_build_resumes_without_asking_again(tmp_path):
    path = tmp_path / "cache.jsonl"
    with LoopbackLLM(latency=0.15) as server:
        child = spawn(["-c", CHILD, server.url, path, 12], tmp_path)
        try:
            wait_for(child, tmp_path, lambda: path.exists() and len(path.read_bytes().splitlines()) >= 3)
        finally:
            child.kill()                                                  # kill -9, holding the cache's lock
            child.wait(timeout=10)
        done, asked_before = len(pool.CotCache(path).records), -1
        while asked_before != len(server.requests):  # the dead child's last request may still come in
            asked_before = len(server.requests)
            time.sleep(0.5)
        assert 3 <= done < 12 and asked_before <= done + 1                # one worker: one was in flight
        texts = build(image_jobs(12), path, client(server, timeout=5), workers=4)  # the lock died with it
        assert (texts.cached, texts.new, len(server.requests) - asked_before) == (done, 12 - done, 12 - done)


def test_two_builds_on_one_cache_ask_once_for_each_text(tmp_path):
    """Two builds wait for a third's cache lock, then one asks for every text, the other finds them cached."""
    path, folders = tmp_path / "cache.jsonl", [tmp_path, tmp_path / "b"]
    with LoopbackLLM(latency=0.05) as server:
        with pool.CotCache(path).writing():
            folders[1].mkdir()
            children = [spawn(["-c", CHILD, server.url, path, 6], folder) for folder in folders]
            for child, folder in zip(children, folders):
                wait_for(child, folder, lambda: "waiting" in (folder / "stdout.txt").read_text())
        assert [finish(child, folder)[0] for child, folder in zip(children, folders)] == [0, 0]
    last = sorted((f / "stdout.txt").read_text().splitlines()[-1] for f in folders)
    assert last == ["built 0 6", "built 6 0"]
    assert len(server.requests) == 6 and len(path.read_text().splitlines()) == 6


def cfg_for(root, **kw):
    return SimpleNamespace(**{**dict(
        data_root=str(root), cot_backend="auto", llm_url="", llm_model="", llm_api_key_env="CERS_TEST_KEY",
        llm_temperature=0.2, llm_timeout=0.5, llm_workers=2, llm_retries=1, llm_vision=False, cot_cache="",
        modality="LGE MRI", anatomy="heart", target="left atrium"), **kw})


class Untouchable:  # a label that fails the moment anything looks at it
    def __getattr__(self, name):
        raise AssertionError(f"an unlabeled or test label was used ({name})")

    def __array__(self, *args, **kwargs):
        raise AssertionError("an unlabeled or test label was used")


def test_build_pool_offline_uses_only_labeled_masks_and_a_read_only_full_cache(tmp_path, capsys, monkeypatch):
    assert pool.check_cache_writable(cfg_for(tmp_path / "new")) == tmp_path / "new" / "cot_cache.jsonl"
    (tmp_path / "taken" / "cot_cache.jsonl").mkdir(parents=True)      # a folder where the file goes
    (tmp_path / "file").write_text("")
    for root, cause in [(tmp_path / "taken", "read (Is a directory)"),
                        (tmp_path / "file" / "LA", "created (Not a directory)")]:
        with pytest.raises(pool.CacheError) as failure:
            pool.check_cache_writable(cfg_for(root))
        assert str(failure.value) == (f"{root / 'cot_cache.jsonl'}: the CoT cache cannot be {cause}; "
                                      "set --cot_cache or fix its folder")
    elsewhere = cfg_for(tmp_path / "file", cot_cache=str(tmp_path / "cots.jsonl"))
    assert pool.check_cache_writable(elsewhere) == tmp_path / "cots.jsonl"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cot_cache.jsonl", "file", "taken"]
    volumes = {f"L{i}": toy_case(i) for i in range(2)}
    volumes.update({k: (toy_case(10 + i)[0], Untouchable()) for i, k in enumerate(["U0", "U1", "T0"])})
    split, cfg = SimpleNamespace(labeled=["L0", "L1"], unlabeled=["U0", "U1"], test=["T0"]), cfg_for(tmp_path)
    texts = pool.build_pool(cfg, split, volumes, progress=False)
    assert sorted(texts.mask) == ["L0", "L1"] and sorted(texts.image) == sorted(volumes)
    assert texts.mask["L0"] != texts.image["L0"]
    out = capsys.readouterr().out
    assert out.count("offline descriptors back end") == 1 and "0 cached, 7 new, 0 failed" in out
    with pytest.raises(ConfigError, match="needs llm_url and llm_model"):       # refused by the config
        get_config("PHANTOM_8", ["--cot_backend=llm"])

    def read_only(file, mode="r", *args, **kwargs):  # refuses writing even to root, whom chmod does not stop
        if set(mode) & set("wax+"):
            raise PermissionError(13, "Permission denied")
        return open(file, mode, *args, **kwargs)
    monkeypatch.setattr(pool, "open", read_only, raising=False)
    cache = tmp_path / "cot_cache.jsonl"
    cache.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        assert pool.check_cache_writable(cfg) == cache
        again = pool.build_pool(cfg, split, volumes, progress=False)
        assert (again.cached, again.new, again.image, len(list(tmp_path.iterdir()))) == (7, 0, texts.image, 3)
        with LoopbackLLM() as server:                                 # an LLM's texts are not cached: refused
            with pytest.raises(pool.CacheError) as failure:
                pool.build_pool(cfg_for(tmp_path, llm_url=server.url, llm_model="m"), split, volumes,
                                progress=False)
        assert server.requests == [] and str(failure.value) == (
            f"{cache}: texts are missing from the CoT cache and it cannot be written (Permission denied); "
            "make it writable or set --cot_cache")
    finally:
        tmp_path.chmod(0o755)

@pytest.mark.filterwarnings("always")
def test_api_key_and_control_characters_reach_no_message_or_cache(tmp_path, capfd, monkeypatch, recwarn):
    monkeypatch.setenv("CERS_TEST_KEY", KEY)
    volumes = {"L0": toy_case(0), "U0": (toy_case(1)[0], Untouchable())}
    split = SimpleNamespace(labeled=["L0"], unlabeled=["U0"], test=[])
    dirty = GOOD.replace("Mildly", "\x1b[31mMildly\x1b[0m\x07").replace("Sharp", "Sh\x9barp\x7f\r\u202e")
    # the server echoes the key in an error, as some providers do, with escape sequences
    error = ("error", 401, f"Incorrect API key provided: {KEY}\x1b]0;owned\x07\nnot \x1b[2Jfound\x00")
    with LoopbackLLM(reply=dirty, script=[error]) as server:
        cfg = cfg_for(tmp_path, llm_url=server.url, llm_model="test-model", llm_workers=1)
        with pytest.raises(llm.LLMError) as failure:
            pool.build_pool(cfg, split, volumes, progress=False)
        texts = pool.build_pool(cfg, split, volumes, progress=False)       # only the failed case is re-asked
        assert len(server.requests) == 4 and texts.cached == 2             # a client error is not retried
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert "completions: HTTP 401: Incorrect API key provided: *** not found; finished" in str(failure.value)
    assert set(texts.image.values()) == {CLEAN} and not llm.CONTROL.search(pool.cache_path(cfg).read_text())
    out, err = capfd.readouterr()
    seen = [out, err, str(failure.value), repr(failure.value), repr(llm.LLMClient("u", "m", KEY))]
    seen += [str(w.message) for w in recwarn] + [p.read_text(errors="replace") for p in tmp_path.rglob("*")]
    assert len(seen) > 5 and not any(KEY in s for s in seen)


def test_cli_builds_then_shows_a_phantom_pool_without_raw_control_characters(tmp_path, capsys):
    args = ["--exp", "PHANTOM_8", f"--data_root={tmp_path}", "--phantom_cases=10,3",
            "--phantom_shape=32,32,32", f"--cot_cache={tmp_path / 'cots' / 'pool.jsonl'}"]
    pool.main(args + ["--workers=2"])
    assert "0 cached, 21 new, 0 failed (descriptors" in capsys.readouterr().out      # 8 mask + 13 image CoTs
    pool.main(args)
    assert "21 cached, 0 new, 0 failed" in capsys.readouterr().out
    case_id = (tmp_path / "train.list").read_text().split()[0]
    with open(tmp_path / "cots" / "pool.jsonl", "a") as f:                # a hand-edited record
        f.write(json.dumps({"case_id": case_id, "kind": "image", "backend": "llm", "model": "m\x1b]0;t\x07",
                            "prompt_hash": "p", "content_hash": "c", "text": "\x1b[31mTexture: red"}) + "\n")
    pool.main(args + ["--show", case_id])
    out = capsys.readouterr().out
    assert out.count("Texture:") == 3 and f"mask CoT | descriptors | {pool.WRITER}" in out
    assert "image CoT | llm | m | prompt p" in out and "\nTexture: red\n" in out
    assert not llm.CONTROL.search(out)
