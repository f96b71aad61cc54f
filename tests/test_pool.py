"""pool.py: morphology on hand-made shapes, CoT parsing on real LLM replies, the descriptors writer,
the LLM client against a loopback HTTP server, the cache, resuming a killed build, and the API key."""
import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import pool
from llm_server import GOOD, LoopbackLLM

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-8f3a1c5e9d"  # a fake API key that must never leave the Authorization header


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def toy_case(seed=0, shape=(48, 48, 32), blur=0.0):
    """A small volume: bright target ball, a bright look-alike tube touching it, darker tissue, noise."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    target = ball(shape, (20, 24, 16), 8)
    tube = np.zeros(shape, bool)
    tube[27:40, 21:27, 13:19] = True
    image = np.where(ball(shape, (24, 24, 16), 22), 1.0, 0.0) + 2.0 * (target | tube)
    if blur:
        image = ndimage.gaussian_filter(image, blur)
    return (image + rng.normal(0, 0.15, shape)).astype(np.float32), target.astype(np.uint8)


CONTEXT = {"modality": "MRI", "anatomy": "heart", "target": "left atrium"}


def client(server, **kw):
    return pool.LLMClient(server.url, "test-model", **{"timeout": 0.2, "backoff": 0.01, "retries": 3, **kw})


def image_jobs(n, shape=(16, 16, 8)):
    return [pool.Job(f"case{i:02d}", "image", np.random.default_rng(i).normal(size=shape).astype(np.float32))
            for i in range(n)]


def test_import_has_no_side_effects():
    code = "import sys, pool; print(sorted(m for m in ('train', 'data', 'matplotlib', 'torch') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, "[]\n", "")


# ----------------------------------------------------------------------------- morphology

def test_morphology_sphere():
    r = 12
    d = dict(zip(pool.MORPH_NAMES, pool.morphology(ball((48, 48, 40), (24, 24, 20), r))))
    assert d["fg_fraction"] == pytest.approx(4 / 3 * np.pi * r ** 3 / (48 * 48 * 40), rel=0.03)
    assert (d["extent_x"], d["extent_z"]) == pytest.approx((25 / 48, 25 / 40))
    assert d["axis_ratio_mid"] == pytest.approx(1, abs=1e-3) and d["axis_ratio_min"] == pytest.approx(1, abs=1e-3)
    # a digital sphere has about 1.5 x 4 pi r^2 faces: faces / volume ~ 4.5 / r
    assert d["surface_to_volume"] == pytest.approx(4.5 / r, rel=0.1)
    centroid = [d[f"centroid_{a}"] for a in "xyz"]
    assert centroid == pytest.approx([0.5 / 48, 0.5 / 48, 0.5 / 40], abs=1e-6)  # centre voxel 24 vs (48 - 1) / 2
    assert (d["components"], d["largest_share"], d["border_contact"]) == (1, 1, 0)


def test_morphology_box_exact():
    mask = np.zeros((40, 30, 20), bool)
    mask[0:20, 10:20, 5:10] = True          # 20 x 10 x 5, touching the x = 0 face
    d = dict(zip(pool.MORPH_NAMES, pool.morphology(mask)))
    assert d["fg_fraction"] == pytest.approx(1000 / 24000)
    assert [d[f"extent_{a}"] for a in "xyz"] == pytest.approx([0.5, 1 / 3, 0.25])
    assert (d["axis_ratio_mid"], d["axis_ratio_min"]) == pytest.approx((0.5, 0.25))  # side ratios, exactly
    # the face on the patch cut (x = 0) is not surface
    assert d["surface_to_volume"] == pytest.approx((2 * 200 + 2 * 100 + 50) / 1000)
    assert [d[f"centroid_{a}"] for a in "xyz"] == pytest.approx([(9.5 - 19.5) / 40, (14.5 - 14.5) / 30, (7 - 9.5) / 20])
    assert d["border_contact"] == pytest.approx(1 / 6)


def test_morphology_two_blobs_and_batch():
    shape = (40, 40, 32)
    two = ball(shape, (10, 10, 10), 6) | ball(shape, (28, 28, 20), 4)
    sizes = ball(shape, (10, 10, 10), 6).sum(), ball(shape, (28, 28, 20), 4).sum()
    d = dict(zip(pool.MORPH_NAMES, pool.morphology(two)))
    assert d["components"] == 2
    assert d["largest_share"] == pytest.approx(max(sizes) / sum(sizes))
    # a batch is its cases one by one: components do not leak across cases, an empty mask is all zeros
    batch = np.stack([two, np.zeros(shape, bool), ball(shape, (20, 20, 16), 9), two])
    out = pool.morphology_batch(batch)
    assert out.shape == (4, pool.MORPH_DIM) and out.dtype == np.float32
    assert np.array_equal(out[1], np.zeros(pool.MORPH_DIM))
    for row, mask in zip(out, batch):
        np.testing.assert_allclose(row, pool.morphology(mask), rtol=1e-6)
    np.testing.assert_array_equal(out, pool.morphology_batch(batch))  # deterministic


# ----------------------------------------------------------------------------- image statistics

def test_image_stats_follow_the_image():
    sharp_image, mask = toy_case(blur=0.0)
    blurred_image, _ = toy_case(blur=1.5)
    sharp, blurred = pool.image_stats(sharp_image, mask), pool.image_stats(blurred_image, mask)
    assert sharp == pool.image_stats(sharp_image, mask)                       # deterministic
    assert sharp["boundary_sharpness"] > blurred["boundary_sharpness"]
    assert sharp["edge_sharpness"] > blurred["edge_sharpness"]
    assert sharp["lookalike_contact"] > 0 and 0 < sharp["lookalike_share"] < 1  # the tube touches the target
    assert sharp["target_components"] == 1
    only_image = pool.image_stats(sharp_image)
    assert "lookalike_share" not in only_image and only_image["bright_structures"] == 1  # ball + tube merge
    flat = pool.image_stats(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8))
    assert all(np.isfinite(v) for v in flat.values())


# ----------------------------------------------------------------------------- prompts and parsing

def test_parse_real_llm_replies(brisc_csv):
    with open(brisc_csv, newline="", encoding="utf-8") as f:
        texts = [row[k] for row in csv.DictReader(f) for k in ("cot_mask", "cot_no_mask")]
    assert len(texts) >= 100
    for text in texts:
        fields = pool.parse_cot(text)
        assert all(len(fields[k]) > 10 for k in pool.FIELDS)
        assert pool.parse_cot(pool.format_cot(fields)) == fields
    first = pool.parse_cot(texts[0])
    assert first["texture"].startswith("Heterogeneous") and first["summary"].endswith("challenging.")


def test_parse_tolerates_markdown_and_chatter():
    text = ("Sure! Here is the analysis.\n\n"
            "1. **Texture:** Bright,  uniform\n   blood pool.\n"
            "2. **Boundary**: Sharp rim.\n"
            "### context: Veins nearby.\n"
            "- SUMMARY： Easy case.\n\nLet me know if you need more.")
    assert pool.parse_cot(text) == {"texture": "Bright, uniform blood pool.", "boundary": "Sharp rim.",
                                    "context": "Veins nearby.", "summary": "Easy case."}
    think = "<think>Texture: draft</think>" + GOOD
    assert pool.parse_cot(think) == pool.parse_cot(GOOD)


@pytest.mark.parametrize("text", [
    "", "Texture: a\nBoundary: b\nContext: c",                         # missing a field
    "Texture: a\nBoundary: **  **\nContext: c\nSummary: d",           # an empty field
    "The texture: is bright and the boundary: is sharp.",              # prose, not headings
    None,
])
def test_parse_rejects_malformed(text):
    with pytest.raises(ValueError):
        pool.parse_cot(text)


def test_templates_render_and_hash():
    values = {"modality": "MRI", "anatomy": "heart", "target": "left atrium", "descriptors": "- contrast: 3"}
    for kind in pool.KINDS:
        template = pool.load_template(kind)
        prompt = pool.render_prompt(template, values)
        assert "{" not in prompt and "left atrium" in prompt and "- contrast: 3" in prompt
        assert all(f"{f.capitalize()}:" in prompt for f in pool.FIELDS) and "128 tokens" in prompt
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
    stats = pool.image_stats(image, mask)
    for kind in pool.KINDS:
        text = pool.write_cot(stats, kind, **CONTEXT)
        assert text == pool.write_cot(stats, kind, **CONTEXT)             # deterministic
        assert set(pool.parse_cot(text)) == set(pool.FIELDS)
        assert 60 <= len(text.split()) <= 120                             # about 128 tokens
        assert not any(c.isdigit() for c in text)                         # no coordinates or numbers
        assert "pulmonary veins" in text                                  # LA vocabulary
    low = {k: lo - 1 for k, ((lo, hi), _) in pool.WORDING.items()}
    high = {k: hi + 1 for k, ((lo, hi), _) in pool.WORDING.items()}
    blurred, sharp = (pool.parse_cot(pool.write_cot({**stats, **s}, "mask", **CONTEXT)) for s in (low, high))
    assert blurred["boundary"].startswith("Blurred") and sharp["boundary"].startswith("Sharp")
    assert "Markedly heterogeneous" in sharp["texture"] and "Homogeneous" in blurred["texture"]
    assert blurred["summary"].endswith("difficulty is weak contrast with its surroundings and blurred margins.")
    other = pool.write_cot(stats, "image", "CT", "abdomen", "liver")
    assert "adjacent abdomen structures" in other and "pulmonary" not in other


# ----------------------------------------------------------------------------- the llm back end

def test_llm_ok_request_format():
    with LoopbackLLM() as server:
        text = client(server, api_key=KEY, temperature=0.3).ask("describe")
    assert text == pool.format_cot(pool.parse_cot(GOOD))
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"] == {"model": "test-model", "temperature": 0.3, "messages": [{"role": "user", "content": "describe"}]}


@pytest.mark.parametrize("behaviour", ["500", "badjson", "slow", "missing"])
def test_llm_retries_then_succeeds(behaviour):
    with LoopbackLLM(script=[behaviour, behaviour], slow=0.6) as server:
        assert client(server).ask("describe") == pool.format_cot(pool.parse_cot(GOOD))
    assert len(server.requests) == 3


def test_llm_honours_retry_after():
    with LoopbackLLM(script=[("429", 0.4)]) as server:
        start = time.monotonic()
        client(server).ask("describe")
        assert time.monotonic() - start >= 0.4
    assert len(server.requests) == 2


def test_llm_gives_up_after_bounded_retries():
    with LoopbackLLM(script=["missing"] * 10) as server:
        with pytest.raises(pool.LLMError, match="no valid CoT after 4 attempts.*Boundary"):
            client(server, retries=3).ask("describe")
    assert len(server.requests) == 4


def test_llm_unreachable_server_is_retried_then_reported():
    import socket
    with socket.socket() as s:          # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lonely = pool.LLMClient(f"http://127.0.0.1:{port}/v1", "test-model", timeout=0.2, backoff=0.01, retries=2)
    with pytest.raises(pool.LLMError, match="after 3 attempts; last: ConnectionError"):
        lonely.ask("describe")


def test_llm_client_error_fails_at_once():
    with LoopbackLLM(script=[("error", 400, "model 'nope' not found")]) as server:
        with pytest.raises(pool.LLMError, match="HTTP 400: model 'nope' not found"):
            client(server).ask("describe")
    assert len(server.requests) == 1


def test_vision_sends_a_png_with_the_mask_outlined_only_when_given(tmp_path):
    import matplotlib.image
    image, mask = toy_case()
    with pytest.raises(ValueError, match="'image' with a mask"):
        pool.Job("a", "image", image, mask)                  # the image-only path never receives a label
    jobs = [pool.Job("a", "mask", image, mask), pool.Job("a", "image", image)]
    with LoopbackLLM() as server:
        pool.build_cots(jobs, pool.CotCache(tmp_path / "cache.jsonl"), "llm", CONTEXT, client(server), vision=True, progress=False)
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
        assert {tuple(sorted(r)) for r in records} == {("backend", "case_id", "created", "kind", "model", "prompt_hash", "text")}
        # a crash mid-write leaves a torn last line: skipped with a warning, the next record starts a fresh line
        with open(path, "a") as f:
            f.write(json.dumps(records[0])[:40])
        with pytest.warns(UserWarning, match="cache.jsonl:4: skipping a damaged"):
            cache = pool.CotCache(path)
        assert len(cache.records) == 3
        other_model = pool.LLMClient(server.url, "other-model", timeout=0.2)
        assert pool.build_cots(jobs, cache, "llm", CONTEXT, other_model, progress=False).new == 3
        prompts = tmp_path / "prompts"
        prompts.mkdir()
        for kind, name in pool.TEMPLATES.items():
            (prompts / name).write_text(pool.load_template(kind) + "\nBe brief.")
        changed = pool.build_cots(jobs, cache, "llm", CONTEXT, client(server), prompt_dir=prompts, progress=False)
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
        texts = pool.build_cots(image_jobs(3), pool.CotCache(path), "llm", CONTEXT, client(server, retries=3), progress=False)
        assert (texts.new, len(texts.failed)) == (2, 1)
        (case_id, kind), reason = next(iter(texts.failed.items()))
        assert kind == "image" and "Boundary" in reason
        assert case_id not in texts.image and len(path.read_text().splitlines()) == 2
        retry = pool.build_cots(image_jobs(3), pool.CotCache(path), "llm", CONTEXT, client(server), progress=False)
        assert (retry.cached, retry.new, len(server.requests)) == (2, 1, 7)


def test_killed_build_resumes_without_asking_again(tmp_path):
    path = tmp_path / "cache.jsonl"
    script = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
              "import pool, test_pool\n"
              f"client = pool.LLMClient(sys.argv[1], 'test-model', timeout=5)\n"
              f"pool.build_cots(test_pool.image_jobs(12), pool.CotCache({str(path)!r}), 'llm', test_pool.CONTEXT, client, progress=False)\n")
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
        asked_before = len(server.requests)
        assert 3 <= done < 12 and asked_before <= done + 1
        texts = pool.build_cots(image_jobs(12), pool.CotCache(path), "llm", CONTEXT, client(server), workers=4, progress=False)
        assert (texts.cached, texts.new) == (done, 12 - done)
        assert len(server.requests) - asked_before == 12 - done           # finished cases are not asked again


def cfg_for(tmp_path, **kw):
    return SimpleNamespace(**{
        "data_root": str(tmp_path), "cot_backend": "auto", "llm_url": "", "llm_model": "", "llm_api_key_env": "CERS_TEST_KEY",
        "llm_temperature": 0.2, "llm_timeout": 0.5, "llm_workers": 2, "llm_retries": 1, "llm_vision": False,
        "modality": "late gadolinium-enhanced cardiac MRI", "anatomy": "heart", "target": "left atrium", **kw})


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
    with pytest.raises(ValueError, match="needs llm_url and llm_model"):
        pool.build_pool(cfg_for(tmp_path, cot_backend="llm"), split, volumes)


def test_api_key_is_sent_and_never_leaks(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("CERS_TEST_KEY", KEY)
    volumes = {"L0": toy_case(0), "U0": (toy_case(1)[0], Untouchable())}
    split = SimpleNamespace(labeled=["L0"], unlabeled=["U0"], test=[])
    # the server echoes the key in an error, as some providers do; it must not reach the message
    with LoopbackLLM(script=[("error", 401, f"Incorrect API key provided: {KEY}")]) as server:
        cfg = cfg_for(tmp_path, llm_url=server.url, llm_model="test-model", llm_workers=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(pool.LLMError) as failure:
                pool.build_pool(cfg, split, volumes, progress=False)
            texts = pool.build_pool(cfg, split, volumes, progress=False)   # the failed case only is asked again
        assert len(server.requests) == 4 and texts.cached == 2
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert "401" in str(failure.value) and "***" in str(failure.value)
    out, err = capfd.readouterr()
    seen = [out, err, str(failure.value), repr(failure.value), repr(pool.LLMClient("u", "m", KEY))]
    seen += [str(w.message) for w in caught]
    seen += [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    assert len(seen) > 5 and not any(KEY in s for s in seen)


def test_cli_builds_then_shows_a_phantom_pool(tmp_path, capsys):
    pytest.importorskip("train")
    pytest.importorskip("phantom")
    args = ["--exp", "PHANTOM_8", f"--data_root={tmp_path}", "--phantom_cases=10,3", "--phantom_shape=32,32,32"]
    pool.main(args + ["--workers=2"])
    assert "0 cached, 21 new, 0 failed (descriptors" in capsys.readouterr().out      # 8 mask + 13 image CoTs
    pool.main(args)
    assert "21 cached, 0 new, 0 failed" in capsys.readouterr().out
    case_id = (tmp_path / "train.list").read_text().split()[0]
    pool.main(args + ["--show", case_id])
    out = capsys.readouterr().out
    assert out.count("Texture:") == 2 and "mask CoT | descriptors | descriptors-v1" in out


def test_morphology_does_not_depend_on_the_batch():
    """A mask's descriptors are its own: the same alone and beside another mask, border faces included."""
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert pool.morphology(cube)[pool.MORPH_NAMES.index("surface_to_volume")] == pytest.approx(54 / 27)
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[0:4, 0:4, 0:4] = True                      # touches three faces of the patch
    b[5:9, 5:9, 5:9] = True
    assert np.allclose(pool.morphology(a), pool.morphology_batch(np.stack([a, b]))[0])
    assert np.allclose(pool.morphology(b), pool.morphology_batch(np.stack([a, b]))[1])


# ----------------------------------------------------------------------------- morphology on the device

def helix(shape, turns, radius, pitch):
    """A one-voxel-thin, face-connected coil about the z axis: a chain of short runs, the hardest shape for
    label propagation (each round moves a label along a few runs only)."""
    t = np.linspace(0, 2 * np.pi * turns, 200 * turns)
    points = np.rint(np.stack([shape[0] // 2 + radius * np.cos(t), shape[1] // 2 + radius * np.sin(t),
                               2 + pitch * t / (2 * np.pi)], 1)).astype(int)
    mask, p = np.zeros(shape, bool), points[0].copy()
    mask[tuple(p)] = True
    for q in points:                       # one unit move at a time, so consecutive voxels share a face
        for a in range(3):
            while p[a] != q[a]:
                p[a] += np.sign(q[a] - p[a])
                mask[tuple(p)] = True
    return mask


def made_masks(shape=(40, 36, 28)):
    """Hand-made masks, one batch: empty, full, ball, box on three patch faces, two blobs, a coil,
    smoothed noise (many components, cut by the patch faces)."""
    from scipy import ndimage
    box = np.zeros(shape, bool)
    box[0:25, 10:, 3:] = True
    noise = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=shape), 1.5) > 0.15
    return np.stack([np.zeros(shape, bool), np.ones(shape, bool), ball(shape, (20, 18, 14), 9), box,
                     ball(shape, (10, 10, 10), 6) | ball(shape, (28, 26, 20), 4), helix(shape, 3, 9, 7), noise])


def assert_same_morphology(masks, **kw):
    """morphology_torch against the numpy/scipy oracle: components exactly, the rest to float32 rounding."""
    import torch
    out, converged = pool.morphology_torch(torch.as_tensor(masks), return_converged=True, **kw)
    ref = pool.morphology_batch(masks)
    assert out.dtype == torch.float32 and out.shape == ref.shape and converged.all()
    col = pool.MORPH_NAMES.index("components")
    np.testing.assert_array_equal(out[:, col].numpy(), ref[:, col])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_morphology_torch_matches_numpy_on_made_masks():
    import torch
    masks = made_masks()
    assert_same_morphology(masks)
    out = pool.morphology_torch(torch.from_numpy(masks[::-1].astype(np.uint8)))  # {0, 1} input, batch order
    np.testing.assert_allclose(out.numpy()[::-1], pool.morphology_batch(masks), rtol=1e-4, atol=1e-5)


def test_surface_faces_are_differing_pairs_inside_the_patch():
    """morphology_torch counts faces as neighbour pairs inside the patch that differ; morphology_batch
    counts them in the batch's padded bounding-box crop. The two agree, mask by mask and in a batch."""
    masks = made_masks()
    pairs = sum(np.count_nonzero(np.diff(masks, axis=a), axis=(1, 2, 3)) for a in (1, 2, 3))
    col = pool.MORPH_NAMES.index("surface_to_volume")
    volume = np.maximum(masks.sum((1, 2, 3)), 1)
    np.testing.assert_allclose(pool.morphology_batch(masks)[:, col] * volume, pairs, rtol=1e-6)
    np.testing.assert_allclose(np.array([pool.morphology(m)[col] for m in masks]) * volume, pairs, rtol=1e-6)


def test_eigvalsh3_matches_linalg():
    import torch
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    spectra = [(2, 2, 2), (3, 1, 1), (3, 3, 1), (1e4, 1, 1e-3), (5, 0, 0)]      # equal eigenvalues included
    a = [rotation @ np.diag(s) @ rotation.T for s in spectra] + [x @ x.T for x in rng.normal(size=(20, 3, 3))]
    a = np.stack(a)
    want = np.linalg.eigvalsh(a)[:, ::-1]                                   # (N, 3), largest first
    scale = np.abs(want).max(1, keepdims=True)
    np.testing.assert_allclose(pool.eigvalsh3(torch.from_numpy(a)).numpy() / scale, want / scale, atol=1e-12)


def test_morphology_torch_reads_no_values():
    """Nothing depends on the values on the host (no sync on a GPU): it runs on the meta device, which has
    no data, where .item(), nonzero, boolean indexing, unique and bincount all fail."""
    import torch
    out, converged = pool.morphology_torch(torch.zeros(3, 12, 10, 8, dtype=torch.bool, device="meta"),
                                           return_converged=True)
    assert (out.shape, out.dtype, out.device.type) == ((3, pool.MORPH_DIM), torch.float32, "meta")
    assert (converged.shape, converged.dtype) == ((3,), torch.bool)


def test_too_few_rounds_are_reported():
    """A long coil needs more rounds than a ball (4 against 1); with too few, it is reported, the coil's
    components are over-counted and its largest one is too small, and the ball beside it is exact."""
    import torch
    shape = (24, 24, 60)
    masks = np.stack([helix(shape, 6, 8, 8), ball(shape, (12, 12, 30), 6)])
    col = [pool.MORPH_NAMES.index(k) for k in ("components", "largest_share")]
    out, converged = pool.morphology_torch(torch.from_numpy(masks), rounds=2, return_converged=True)
    assert converged.tolist() == [False, True]
    assert out[0, col[0]] > 1 and out[0, col[1]] < 1 and out[1, col].tolist() == [1, 1]
    assert_same_morphology(masks)                                           # the default budget settles both


# LA cases and grid crops that need the most propagation rounds (3) of all 100 cases (see pool.LABEL_ROUNDS)
HARD_LA_CROPS = (("A11O45O3NAXWM7T2H8CH", (5, 6)), ("SN4LF8SGBSRQUPTDSX78", (4, 5)))


def test_morphology_torch_matches_numpy_on_real_la_crops(la_root):
    """Training-grid crops (112 x 112 x 80) of real LA ground truth."""
    import data
    import retrieve
    masks = []
    for case_id, crops in HARD_LA_CROPS:
        label = data.read_case(data.case_path(la_root, case_id))[1]
        boxes = retrieve.grid_boxes(label.shape, (112, 112, 80), (112, 112, 80))
        masks += [retrieve.crop(label, boxes[i]) > 0 for i in crops]
    assert_same_morphology(np.stack(masks))
