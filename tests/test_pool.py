"""pool.py: prompt templates, the descriptors writer, the vision montage, the cache (damaged records, failed
writes), resuming a killed build, and the API key (the LLM client itself: test_llm.py)."""
import base64
import io
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import llm
import pool
from config import ConfigError, get_config
from cot import FIELDS, parse_cot
from llm_server import LoopbackLLM
from morphology import image_stats
from test_morphology import toy_case

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-8f3a1c5e9d"  # a fake API key that must never leave the Authorization header

CONTEXT = {"modality": "MRI", "anatomy": "heart", "target": "left atrium"}


def client(server, **kw):
    return llm.LLMClient(server.url, "test-model", **{"timeout": 0.2, "backoff": 0.01, "retries": 3, **kw})


def image_jobs(n, shape=(16, 16, 8)):
    return [pool.Job(f"case{i:02d}", "image", np.random.default_rng(i).normal(size=shape).astype(np.float32))
            for i in range(n)]


# ----------------------------------------------------------------------------- prompts

def test_templates_render_and_hash():
    values = {"modality": "MRI", "anatomy": "heart", "target": "left atrium", "descriptors": "- contrast: 3"}
    for kind in pool.KINDS:
        template = pool.load_template(kind)
        prompt = pool.render_prompt(template, values)
        assert "{" not in prompt and "left atrium" in prompt and "- contrast: 3" in prompt
        assert all(f"{f.capitalize()}:" in prompt for f in FIELDS) and "128 tokens" in prompt
        digest = pool.prompt_hash(template, CONTEXT)
        assert digest == pool.prompt_hash(template, dict(CONTEXT))
        assert digest != pool.prompt_hash(template, CONTEXT, vision=True)
        assert digest != pool.prompt_hash(template + " ", CONTEXT)
        assert digest != pool.prompt_hash(template, {**CONTEXT, "target": "left ventricle"})
    with pytest.raises(KeyError, match="placeholder"):
        pool.render_prompt("{modality} {unknown}", values)


# ----------------------------------------------------------------------------- the descriptors back end

def test_descriptor_writer_follows_the_measurements():
    image, mask = toy_case()
    stats = image_stats(image, mask)
    for kind in pool.KINDS:
        text = pool.write_cot(stats, kind, **CONTEXT)
        assert text == pool.write_cot(stats, kind, **CONTEXT)             # deterministic
        assert set(parse_cot(text)) == set(FIELDS)
        assert 60 <= len(text.split()) <= 120                             # about 128 tokens
        assert not any(c.isdigit() for c in text)                         # no coordinates or numbers
        assert "pulmonary veins" in text                                  # LA vocabulary
    low = {k: lo - 1 for k, ((lo, hi), _) in pool.WORDING.items()}
    high = {k: hi + 1 for k, ((lo, hi), _) in pool.WORDING.items()}
    blurred, sharp = (parse_cot(pool.write_cot({**stats, **s}, "mask", **CONTEXT)) for s in (low, high))
    assert blurred["boundary"].startswith("Blurred") and sharp["boundary"].startswith("Sharp")
    assert "Markedly heterogeneous" in sharp["texture"] and "Homogeneous" in blurred["texture"]
    assert blurred["summary"].endswith("difficulty is weak contrast with its surroundings and blurred "
                                       "margins.")
    other = pool.write_cot(stats, "image", "CT", "abdomen", "liver")
    assert "adjacent abdomen structures" in other and "pulmonary" not in other


# ----------------------------------------------------------------------------- the llm back end

def test_vision_sends_a_png_with_the_mask_outlined_only_when_given(tmp_path):
    import matplotlib.image
    image, mask = toy_case()
    with pytest.raises(ValueError, match="'image' with a mask"):
        pool.Job("a", "image", image, mask)                  # the image-only path never receives a label
    jobs = [pool.Job("a", "mask", image, mask), pool.Job("a", "image", image)]
    with LoopbackLLM() as server:
        pool.build_cots(jobs, pool.CotCache(tmp_path / "cache.jsonl"), "llm", CONTEXT, client(server),
                        vision=True, progress=False)
    assert len(server.requests) == 2
    for request in server.requests:
        text, picture = request["body"]["messages"][0]["content"]
        assert text["type"] == "text" and picture["type"] == "image_url"
        prefix, data = picture["image_url"]["url"].split(",", 1)
        assert prefix == "data:image/png;base64"
        rgb = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3]
        red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
        assert red.any() == ("reference segmentation mask" in text["text"])


# ----------------------------------------------------------------------------- the cache and building

def test_cache_skips_a_torn_line_and_keys_by_prompt_and_model(tmp_path):
    path = tmp_path / "cache.jsonl"
    jobs = image_jobs(3)
    with LoopbackLLM() as server:
        first = pool.build_cots(jobs, pool.CotCache(path), "llm", CONTEXT, client(server), progress=False)
        assert (first.new, first.cached, len(server.requests)) == (3, 0, 3)
        again = pool.build_cots(jobs, pool.CotCache(path), "llm", CONTEXT, client(server), progress=False)
        assert (again.new, again.cached, len(server.requests)) == (0, 3, 3)           # a re-run asks nothing
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert {tuple(sorted(r)) for r in records} == {
            ("backend", "case_id", "content_hash", "created", "kind", "model", "prompt_hash", "text")}
        # a crash mid-write leaves a torn last line: skipped with a warning, the next record starts a new one
        with open(path, "a") as f:
            f.write(json.dumps(records[0])[:40])
        with pytest.warns(UserWarning,
                          match=r"cache.jsonl:4: skipping 1 damaged cache record\(s\) \(line 4;"):
            cache = pool.CotCache(path)
        assert len(cache.records) == 3
        other_model = llm.LLMClient(server.url, "other-model", timeout=0.2)
        assert pool.build_cots(jobs, cache, "llm", CONTEXT, other_model, progress=False).new == 3
        prompts = tmp_path / "prompts"
        prompts.mkdir()
        for kind, name in pool.TEMPLATES.items():
            (prompts / name).write_text(pool.load_template(kind) + "\nBe brief.")
        changed = pool.build_cots(jobs, cache, "llm", CONTEXT, client(server), prompt_dir=prompts,
                                  progress=False)
        assert changed.new == 3 and len(server.requests) == 9
    with pytest.warns(UserWarning, match=":4: skipping"):
        assert len(pool.CotCache(path).records) == 9                          # every later record intact
    with pytest.warns(UserWarning, match=":4: skipping"):
        cache = pool.CotCache(path)
    descriptors = pool.build_cots(jobs, cache, "descriptors", CONTEXT, progress=False)
    assert descriptors.new == 3 and set(descriptors.image.values()).isdisjoint(again.image.values())


def test_failed_case_is_reported_not_cached(tmp_path):
    path = tmp_path / "cache.jsonl"
    with LoopbackLLM(script=["missing"] * 4) as server:
        texts = pool.build_cots(image_jobs(3), pool.CotCache(path), "llm", CONTEXT, client(server, retries=3),
                                progress=False)
        assert (texts.new, len(texts.failed)) == (2, 1)
        (case_id, kind), reason = next(iter(texts.failed.items()))
        assert kind == "image" and "Boundary" in reason
        assert case_id not in texts.image and len(path.read_text().splitlines()) == 2
        retry = pool.build_cots(image_jobs(3), pool.CotCache(path), "llm", CONTEXT, client(server),
                                progress=False)
        assert (retry.cached, retry.new, len(server.requests)) == (2, 1, 7)


def test_records_of_the_wrong_shape_are_skipped_with_one_warning_and_asked_again(tmp_path):
    path = tmp_path / "cache.jsonl"
    jobs = image_jobs(8)
    pool.build_cots(jobs, pool.CotCache(path), "descriptors", CONTEXT, progress=False)
    good = [json.loads(line) for line in path.read_text().splitlines()]
    wrong = [{**good[0], "text": 42}, {k: v for k, v in good[1].items() if k != "content_hash"},
             {**good[2], "kind": ["image"]}, {**good[3], "case_id": None}, {**good[4], "kind": "sketch"},
             {**good[5], "text": ""}, [good[6]], good[7]["text"]]        # the last two are not even dicts
    path.write_text("".join(json.dumps(r) + "\n" for r in wrong) + json.dumps(good[7]) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = pool.CotCache(path)
    assert [str(w.message) for w in caught] == [
        f"{path}:1: skipping 8 damaged cache record(s) (line 1, 2, 3, 4, 5, ...; an interrupted write or "
        "an edit?); their texts are asked for again"]
    again = pool.build_cots(jobs, cache, "descriptors", CONTEXT, progress=False)
    assert (again.cached, again.new) == (1, 7) and again.image == {r["case_id"]: r["text"] for r in good}


def test_a_huge_reply_is_refused_and_not_cached(tmp_path):
    path = tmp_path / "cache.jsonl"
    script = [("huge", 2 * llm.MAX_REPLY), ("claims", 10 ** 12)]
    with LoopbackLLM(script=script) as server:
        texts = pool.build_cots(image_jobs(3), pool.CotCache(path), "llm", CONTEXT, client(server, timeout=5),
                                progress=False)
    assert (texts.new, len(texts.failed), len(server.requests)) == (1, 2, 3)
    assert sorted(r.split(": ", 1)[1].split(";")[0] for r in texts.failed.values()) == [
        f"the reply runs over the {llm.MAX_REPLY} bytes accepted",
        f"the reply would be {10 ** 12} bytes (Content-Length), over the {llm.MAX_REPLY} accepted"]
    assert len(pool.CotCache(path).records) == 1 and len(path.read_text().splitlines()) == 1


def test_a_failed_cache_write_is_one_line_and_keeps_every_record(tmp_path):
    """The file-size limit cuts the next record short: the partial line is removed, the error is one line."""
    path = tmp_path / "cache.jsonl"
    pool.build_cots(image_jobs(2), pool.CotCache(path), "descriptors", CONTEXT, progress=False)
    before = path.read_bytes()
    script = (f"import resource, signal, sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
              "import config, pool, test_pool\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 100}, {len(before) + 100}))\n"
              f"build = lambda argv: pool.build_cots(test_pool.image_jobs(4), pool.CotCache({str(path)!r}), "
              "'descriptors', test_pool.CONTEXT, progress=False)\n"
              "sys.exit(config.cli(build))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"error: {path}: cannot add a CoT text to the cache (File too large); the 2 texts "
                           "cached so far are kept; re-run\n")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["cache.jsonl"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # no damaged line left behind
        assert len(pool.CotCache(path).records) == 2


def test_check_cache_writable_refuses_before_any_data_are_read(tmp_path):
    fine = cfg_for(tmp_path / "not" / "yet")                          # created by the build
    assert pool.check_cache_writable(fine) == tmp_path / "not" / "yet" / "cot_cache.jsonl"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "cot_cache.jsonl").mkdir()                  # a folder where the file goes
    (tmp_path / "file").write_text("")
    for root, cause in [(tmp_path / "taken", "Is a directory"),
                        (tmp_path / "file" / "LA", "Not a directory")]:
        with pytest.raises(pool.CacheError) as failure:
            pool.check_cache_writable(cfg_for(root))
        assert str(failure.value) == (f"{root / 'cot_cache.jsonl'}: the CoT cache cannot be written "
                                      f"({cause}); make its folder writable or set --data_root")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cot_cache.jsonl", "file", "taken"]


def settled(server, quiet=0.5):
    """The server's request count once no new request has come in for `quiet` seconds: requests a killed
    client sent just before it died can still be accepted from the listen queue and counted a little later."""
    count = -1
    while count != len(server.requests):
        count = len(server.requests)
        time.sleep(quiet)
    return count


def test_killed_build_resumes_without_asking_again(tmp_path):
    path = tmp_path / "cache.jsonl"
    script = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
              "import llm, pool, test_pool\n"
              f"client = llm.LLMClient(sys.argv[1], 'test-model', timeout=5)\n"
              f"pool.build_cots(test_pool.image_jobs(12), pool.CotCache({str(path)!r}), 'llm', "
              "test_pool.CONTEXT, client, progress=False)\n")
    with LoopbackLLM(latency=0.15) as server:
        child = subprocess.Popen([sys.executable, "-c", script, server.url], cwd=ROOT)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and child.poll() is None:
                if path.exists() and len(path.read_bytes().splitlines()) >= 3:
                    break
                time.sleep(0.02)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        done = len(pool.CotCache(path).records)
        asked_before = settled(server)                                   # the dead child's last request in
        assert 3 <= done < 12 and asked_before <= done + 1                # one worker: one was in flight
        texts = pool.build_cots(image_jobs(12), pool.CotCache(path), "llm", CONTEXT,
                                client(server, timeout=5), workers=4, progress=False)  # no retry under load
        assert (texts.cached, texts.new) == (done, 12 - done)
        assert len(server.requests) - asked_before == 12 - done           # finished cases are not asked again


def cfg_for(tmp_path, **kw):
    return SimpleNamespace(**{
        "data_root": str(tmp_path), "cot_backend": "auto", "llm_url": "", "llm_model": "",
        "llm_api_key_env": "CERS_TEST_KEY", "llm_temperature": 0.2, "llm_timeout": 0.5, "llm_workers": 2,
        "llm_retries": 1, "llm_vision": False, "modality": "late gadolinium-enhanced cardiac MRI",
        "anatomy": "heart", "target": "left atrium", **kw})


class Untouchable:
    """A label that fails the moment anything looks at it."""
    def __getattr__(self, name):
        raise AssertionError(f"an unlabeled or test label was used ({name})")

    def __array__(self, *args, **kwargs):
        raise AssertionError("an unlabeled or test label was used")


def test_build_pool_offline_uses_only_labeled_masks(tmp_path, capsys):
    volumes = {f"L{i}": toy_case(i) for i in range(2)}
    volumes.update({f"U{i}": (toy_case(10 + i)[0], Untouchable()) for i in range(2)})
    volumes["T0"] = (toy_case(20)[0], Untouchable())
    split = SimpleNamespace(labeled=["L0", "L1"], unlabeled=["U0", "U1"], test=["T0"])
    texts = pool.build_pool(cfg_for(tmp_path), split, volumes, progress=False)
    assert sorted(texts.mask) == ["L0", "L1"] and sorted(texts.image) == sorted(volumes)
    assert texts.mask["L0"] != texts.image["L0"]
    out = capsys.readouterr().out
    assert out.count("offline descriptors back end") == 1 and "0 cached, 7 new, 0 failed" in out
    again = pool.build_pool(cfg_for(tmp_path), split, volumes, progress=False)
    assert (again.cached, again.new) == (7, 0) and again.image == texts.image
    with pytest.raises(ConfigError, match="needs llm_url and llm_model"):       # refused by the config
        get_config("PHANTOM_8", ["--cot_backend=llm"])


def test_api_key_is_sent_and_never_leaks(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("CERS_TEST_KEY", KEY)
    volumes = {"L0": toy_case(0), "U0": (toy_case(1)[0], Untouchable())}
    split = SimpleNamespace(labeled=["L0"], unlabeled=["U0"], test=[])
    # the server echoes the key in an error, as some providers do; it must not reach the message
    with LoopbackLLM(script=[("error", 401, f"Incorrect API key provided: {KEY}")]) as server:
        cfg = cfg_for(tmp_path, llm_url=server.url, llm_model="test-model", llm_workers=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(llm.LLMError) as failure:
                pool.build_pool(cfg, split, volumes, progress=False)
            texts = pool.build_pool(cfg, split, volumes, progress=False)   # only the failed case is re-asked
        assert len(server.requests) == 4 and texts.cached == 2
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert "401" in str(failure.value) and "***" in str(failure.value)
    out, err = capfd.readouterr()
    seen = [out, err, str(failure.value), repr(failure.value), repr(llm.LLMClient("u", "m", KEY))]
    seen += [str(w.message) for w in caught]
    seen += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert len(seen) > 5 and not any(KEY in s for s in seen)


def test_cli_builds_then_shows_a_phantom_pool(tmp_path, capsys):
    pytest.importorskip("train")
    pytest.importorskip("phantom")
    args = ["--exp", "PHANTOM_8", f"--data_root={tmp_path}", "--phantom_cases=10,3",
            "--phantom_shape=32,32,32"]
    pool.main(args + ["--workers=2"])
    assert "0 cached, 21 new, 0 failed (descriptors" in capsys.readouterr().out      # 8 mask + 13 image CoTs
    pool.main(args)
    assert "21 cached, 0 new, 0 failed" in capsys.readouterr().out
    case_id = (tmp_path / "train.list").read_text().split()[0]
    pool.main(args + ["--show", case_id])
    out = capsys.readouterr().out
    assert out.count("Texture:") == 2 and "mask CoT | descriptors | descriptors-v1" in out
