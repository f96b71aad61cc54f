"""Knowledge pool (docs/design.md §4, §5): a four-part chain-of-thought (CoT) text of each labeled case with
its mask and of every case from the image alone, written from image_stats() by the `llm` back end (llm.py,
prompts/cot_*.txt) or the offline `descriptors` one (write_cot, prompts/descriptors.json), cached in a locked,
append-only JSONL file keyed by content, prompt and model, so concurrent builds never ask twice.
    python pool.py --exp LA_8 [--backend llm --url http://localhost:8000 --model NAME [--vision]] [--show ID]
"""
import argparse
import fcntl
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

import data
import phantom
from config import CersError, cli, get_config
from llm import LLMClient, LLMError, RateLimited, clean, montage_png
from retrieve import FACE6, MORPH_NAMES, morphology_batch

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
TEMPLATES = {"mask": "cot_mask.txt", "image": "cot_image.txt"}  # the prompt template of each kind of CoT
KINDS = tuple(TEMPLATES)
PLACEHOLDERS = ("modality", "anatomy", "target", "descriptors")  # what a template may name in braces
EPS = 1e-6
MIN_BLOB = 2e-4     # a bright structure counts when it holds at least this share of the volume
SMOOTH_SIGMA = 2.0  # voxels; heterogeneity is read from a smoothed image, so fine noise does not count twice
RING = 3            # voxels; the neighbourhood a target is compared with
DESCRIPTORS = PROMPT_DIR / "descriptors.json"  # its wording; the file's "about" says how it is laid out
# the model name the descriptors back end records in the cache: changed wording makes new keys, so new texts
WRITER = "descriptors-" + hashlib.sha256(DESCRIPTORS.read_bytes()).hexdigest()[:8]


def load_template(kind, prompt_dir=PROMPT_DIR):
    """The prompt template of a kind of CoT; a {placeholder} it cannot fill is refused in one line."""
    path = Path(prompt_dir) / TEMPLATES[kind]
    template = path.read_text(encoding="utf-8")
    for name in re.findall(r"\{(\w+)\}", template):
        if name not in PLACEHOLDERS:
            raise CersError(f"{path}: unknown placeholder {{{name}}}; a prompt template may use "
                            f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    return template


def render_prompt(template, values):
    """The template with each {name} replaced by values[name]."""
    return re.sub(r"\{(\w+)\}", lambda match: str(values[match.group(1)]), template)


def prompt_hash(template, context, vision=False):
    """Names a prompt in the cache: a changed template, modality, anatomy, target or image makes new ones."""
    fixed = render_prompt(template, {**context, "descriptors": "{descriptors}"})
    return hashlib.sha256((fixed + ("\n[vision]" if vision else "")).encode()).hexdigest()[:12]


def otsu(values, bins=256):
    """The threshold that best splits `values` into two intensity classes (Otsu's method)."""
    hist, edges = np.histogram(values, bins=bins)
    w0 = np.cumsum(hist.astype(np.float64))
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * (edges[:-1] + edges[1:]) / 2)
    between = w0 * w1 * (m0 / np.maximum(w0, 1) - (m0[-1] - m0) / np.maximum(w1, 1)) ** 2
    return float(edges[1:][np.argmax(between)])


def neighbours(m, combine):
    """m combined with its six face neighbours: np.logical_or dilates, np.logical_and erodes. Slicing is
    faster than scipy's binary morphology on whole volumes; outside the volume counts as the voxel itself."""
    out = m.copy()
    for a in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[a], hi[a] = slice(1, None), slice(None, -1)
        combine(out[tuple(lo)], m[tuple(hi)], out=out[tuple(lo)])
        combine(out[tuple(hi)], m[tuple(lo)], out=out[tuple(hi)])
    return out


def image_stats(image, mask=None):
    """Intensity statistics of a volume (X, Y, Z), and with a mask (labeled cases only) of its target. Two
    Otsu thresholds split the volume into background, tissue and bright structures (in LA MRI the blood
    pools of atrium, veins, ventricle and aorta); intensities are in units of the bright-vs-tissue step, so
    scans with different scaling read alike."""
    def _median(v):
        return float(np.median(v)) if v.size else 0.0

    def _std(v):
        return float(v.std()) if v.size else 0.0
    x = np.asarray(image, dtype=np.float32)
    body = x > otsu(x)
    bright = x > otsu(x[body])
    tissue = body & ~bright
    step = max(_median(x[bright]) - _median(x[tissue]), EPS)                 # bright-vs-tissue intensity step
    grad = np.sqrt(sum(g * g for g in np.gradient(x)))                       # (X, Y, Z) gradient magnitude
    smooth = ndimage.gaussian_filter(x, SMOOTH_SIGMA, truncate=2.0)
    core = neighbours(bright, np.logical_and)
    sizes = np.bincount(ndimage.label(bright, FACE6)[0].ravel())[1:]
    stats = {"contrast": step / max(_std(x[tissue]), EPS),                       # a contrast-to-noise ratio
             "noise": 1.4826 / np.sqrt(2) * _median(np.abs(np.diff(x, axis=0))[body[1:]]) / step,  # robust
             "heterogeneity": _std(smooth[core]) / step,                 # slow variation in bright structures
             "edge_sharpness": 2 * _median(grad[bright & ~core]) / step,  # 1 for an ideal step edge
             "bright_fraction": float(bright.mean()),
             "bright_structures": int((sizes >= MIN_BLOB * x.size).sum()),
             "largest_share": float(sizes.max() / sizes.sum()) if sizes.size else 0.0}  # 1: one pool
    if mask is None:
        return stats
    m = np.asarray(mask).astype(bool, copy=False)
    inner, ring = neighbours(m, np.logical_and), neighbours(m, np.logical_or)
    shell = ring & ~m                                                    # the first voxels outside the target
    for _ in range(RING - 1):
        ring = neighbours(ring, np.logical_or)
    shape = dict(zip(MORPH_NAMES, morphology_batch(m[None])[0]))
    radius = (3 * m.sum() / (4 * np.pi)) ** (1 / 3)
    return {**stats,
            "target_contrast": (_median(x[m]) - _median(x[ring & ~m])) / step,  # target vs its neighbourhood
            "target_heterogeneity": _std(smooth[inner]) / step,
            "boundary_sharpness": 2 * _median(grad[m & ~inner]) / step,
            "lookalike_share": float((bright & ~m).sum() / max(bright.sum(), 1)),  # bright tissue not target
            "lookalike_contact": float(bright[shell].mean()) if shell.any() else 0.0,  # border open to bright
            "target_fraction": float(m.mean()),
            # a digital sphere has about 1.5 * 4 pi r^2 faces: 1 = sphere-like, lower = lobulated
            "target_sphericity": float(6 * np.pi * radius**2 / max(shape["surface_to_volume"] * m.sum(), 1)),
            "target_elongation": float(1 - shape["axis_ratio_min"]),
            "target_components": int(shape["components"])}


@functools.cache
def descriptor_words():
    """The wording of the descriptors back end (prompts/descriptors.json); a broken edit is one line."""
    try:
        return json.loads(DESCRIPTORS.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CersError(f"{DESCRIPTORS}: not valid JSON ({e}); undo the last edit") from None


def write_cot(stats, kind, modality, anatomy, target):
    """A four-part CoT worded from image_stats(): deterministic, about 128 tokens, no numbers."""
    words = descriptor_words()
    known = words["vocab"].get(target.lower(), words["generic"])
    vocab = {k: w.format(anatomy=anatomy) for k, w in known.items()}
    levels = {k: int(stats[k] >= lo) + int(stats[k] >= hi)
              for k, ((lo, hi), _) in words["wording"].items() if k in stats}
    phrases = {k: words["wording"][k][1][lv].format(**vocab) for k, lv in levels.items()}
    hard = [why for k, (why, at) in words["difficulty"][kind].items() if levels[k] == at]
    overall = ("Clearly depicted" if len(hard) <= 1 else "Moderately challenging" if len(hard) == 2
               else "Challenging")
    reason = " and ".join(hard[:2]) or f"following its full extent within the {anatomy}"
    return ("\n".join(words["cot"][kind]).format(modality=modality, target=target, **vocab, **phrases)
            + f"\nSummary: {overall} {target} whose main segmentation difficulty is {reason}.")


class CacheError(CersError, OSError):
    """The CoT cache cannot be read or written; the message names the file and the cause."""


def cache_path(cfg):
    """cfg.cot_cache, or <data_root>/cot_cache.jsonl when that is empty."""
    return Path(cfg.cot_cache or Path(cfg.data_root) / "cot_cache.jsonl")


def check_cache_writable(cfg):
    """The CoT cache's path; before any data are read, refuses one that cannot be read, or is missing and
    cannot be created. An existing cache need not be writable: a build that finds every text only reads it."""
    path = folder = cache_path(cfg)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        (open(path, "rb") if folder == path else tempfile.TemporaryFile(dir=folder)).close()
    except OSError as e:
        raise CacheError(f"{path}: the CoT cache cannot be {'read' if folder == path else 'created'} "
                         f"({e.strerror or e}); set --cot_cache or fix its folder") from None
    return path


class CotCache:
    """Append-only JSONL of CoT records keyed by KEY, the newest of a key winning. Each record is one line
    appended with fsync and a failed write is cut back; damaged lines are skipped, their texts asked again."""
    KEY = ("case_id", "kind", "backend", "model", "prompt_hash", "content_hash")

    def __init__(self, path):
        self.path, self.damaged = Path(path), 0
        self.load()

    def load(self):
        """Read every record of the file (a missing file is an empty cache), warning once of damaged ones."""
        try:
            raw = self.path.read_bytes() if self.path.exists() else b""
        except OSError as e:
            raise CacheError(f"{self.path}: the CoT cache cannot be read ({e.strerror or e})") from None
        self.records, self.torn, damaged = {}, bool(raw) and not raw.endswith(b"\n"), []
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and record.get("kind") in KINDS and all(
                    isinstance(record.get(k), str) and record[k] for k in (*self.KEY, "text")):
                self.records[tuple(record[k] for k in self.KEY)] = record
            else:  # torn, not JSON, or JSON of the wrong shape
                damaged.append(number)
        if damaged and len(damaged) != self.damaged:
            lines = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
            warnings.warn(f"{self.path}:{damaged[0]}: skipping {len(damaged)} damaged cache record(s) (line "
                          f"{lines}; an interrupted write or an edit?); their texts are asked for again")
        self.damaged = len(damaged)

    @contextmanager
    def writing(self):
        """The cache opened for appending under an exclusive lock, then re-read: builds on one cache take
        turns (flock; the kernel frees it when a process dies), the later finding what the earlier added."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise CacheError(f"{self.path}: texts are missing from the CoT cache and it cannot be written "
                             f"({e.strerror or e}); make it writable or set --cot_cache") from None
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"pool: another build is writing {self.path}; waiting for it to finish", flush=True)
                fcntl.flock(file, fcntl.LOCK_EX)
            self.load()
            self.file = file
            yield self

    def add(self, key, text):
        """Append the record of a text under `key` (KEY's values), whole or not at all (inside writing())."""
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {**dict(zip(self.KEY, key)), "created": created, "text": text}
        line = ("\n" if self.torn else "") + json.dumps(record, ensure_ascii=False) + "\n"
        view = memoryview(line.encode())
        start = self.file.seek(0, os.SEEK_END)
        try:
            while view:  # a raw write may take only part of the line
                view = view[self.file.write(view):]
            os.fsync(self.file.fileno())
        except OSError as e:
            self.file.truncate(start)
            raise CacheError(f"{self.path}: cannot add a CoT text to the cache ({e.strerror or e}); "
                             f"the {len(self.records)} texts cached so far are kept; re-run") from None
        self.torn, self.records[key] = False, record


@dataclass
class Job:
    """One text to write: the mask CoT of a labeled case (its mask given), else the image-only CoT of a case,
    which by construction never sees a mask. Its content hash names the voxels described, shape included."""
    case_id: str
    image: np.ndarray
    mask: np.ndarray = None

    def __post_init__(self):
        self.kind = "image" if self.mask is None else "mask"
        digest = hashlib.sha256()
        for array, dtype in ((self.image, np.float32), (self.mask, np.uint8)):
            if array is not None:
                array = np.ascontiguousarray(array, dtype)
                digest.update(repr(array.shape).encode() + array.data)
        self.content_hash = digest.hexdigest()[:16]


@dataclass
class CotTexts:
    """The texts of a build by kind and case ID, with its counts and failures."""
    mask: dict = field(default_factory=dict)    # labeled case ID -> mask CoT
    image: dict = field(default_factory=dict)   # case ID -> image-only CoT
    cached: int = 0                             # texts read from the cache
    new: int = 0                                # texts written in this run
    failed: dict = field(default_factory=dict)  # (case ID, kind) -> reason; not cached, asked again next run


def build_cots(jobs, cache, context, client=None, vision=False, workers=1, prompt_dir=PROMPT_DIR,
               progress=True):
    """The texts of `jobs`: cached ones read, the rest written by `workers` threads under the cache's lock
    (none taken when all are cached). `context` fills the prompts; with `client` (an LLMClient) the llm back
    end writes, with a montage when `vision`, else the descriptors one. Failures go to .failed; RateLimited
    stops the build."""
    backend, model = ("llm", client.model) if client else ("descriptors", WRITER)
    vision = vision and client is not None
    templates = {k: load_template(k, prompt_dir) for k in KINDS}
    hashes = {k: prompt_hash(templates[k], context, vision) for k in KINDS}
    texts, stopped = CotTexts(), []

    def key(job):
        return job.case_id, job.kind, backend, model, hashes[job.kind], job.content_hash

    def missing():
        """The jobs whose text the cache lacks; the others' texts go into `texts`."""
        for job in jobs:
            if key(job) in cache.records:
                getattr(texts, job.kind)[job.case_id] = cache.records[key(job)]["text"]
        return [job for job in jobs if key(job) not in cache.records]

    def write(job):
        if stopped:  # the endpoint asked for a long pause: ask it nothing more
            raise stopped[0]
        stats = image_stats(job.image, job.mask)
        if client is None:
            return write_cot(stats, job.kind, **context)
        listed = "\n".join(f"- {k}: {v:.3g}" for k, v in stats.items())
        try:
            return client.ask(render_prompt(templates[job.kind], {**context, "descriptors": listed}),
                              montage_png(job.image, job.mask) if vision else None)
        except RateLimited as e:
            stopped.append(e)
            raise
    todo = missing()
    if todo:
        with cache.writing():
            todo = missing()  # another build may have written some meanwhile
            executor = ThreadPoolExecutor(max(1, workers))
            try:
                futures = {executor.submit(write, job): job for job in todo}
                for future in tqdm(as_completed(futures), total=len(futures), desc=f"CoT texts ({backend})",
                                   disable=not progress):
                    job = futures[future]
                    try:
                        text = future.result()
                    except RateLimited:
                        raise
                    except LLMError as e:
                        texts.failed[(job.case_id, job.kind)] = str(e)
                        continue
                    cache.add(key(job), text)
                    getattr(texts, job.kind)[job.case_id], texts.new = text, texts.new + 1
            finally:
                executor.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, drop what has not started
    texts.cached = len(jobs) - len(todo)
    return texts


def resolve_backend(cfg):
    """cfg.cot_backend, where "auto" means llm when an endpoint is configured and descriptors otherwise."""
    if cfg.cot_backend == "auto" and not cfg.llm_url:
        print("pool: no LLM endpoint configured (llm_url is empty): CoT texts come from the offline "
              "descriptors back end")
    return cfg.cot_backend if cfg.cot_backend != "auto" else "llm" if cfg.llm_url else "descriptors"


def build_pool(cfg, split, volumes, progress=True):
    """Mask CoTs of the labeled cases and image-only CoTs of every case, writing what the cache lacks.
    `volumes` maps ID -> (image, label); only labeled cases' labels are read, so unlabeled and test masks are
    never measured, rendered or sent. LLMError after the build if texts failed (finished ones are cached)."""
    backend, client = resolve_backend(cfg), None
    if backend == "llm":
        if not (key := os.environ.get(cfg.llm_api_key_env, "")):
            print(f"pool: environment variable {cfg.llm_api_key_env} is empty: sending requests without an "
                  "API key")
        client = LLMClient(cfg.llm_url, cfg.llm_model, key, cfg.llm_temperature, cfg.llm_timeout,
                           cfg.llm_retries)
    elif cfg.llm_vision:
        print("pool: llm_vision has no effect on the descriptors back end")
    jobs = [Job(i, volumes[i][0], volumes[i][1]) for i in split.labeled]
    jobs += [Job(i, volumes[i][0]) for i in [*split.labeled, *split.unlabeled, *split.test]]
    context = {"modality": cfg.modality, "anatomy": cfg.anatomy, "target": cfg.target}
    cache = CotCache(cache_path(cfg))
    texts = build_cots(jobs, cache, context, client, cfg.llm_vision, cfg.llm_workers, progress=progress)
    print(f"pool: {texts.cached} cached, {texts.new} new, {len(texts.failed)} failed "
          f"({backend}, model {client.model if client else WRITER}, cache {cache.path})")
    if texts.failed:
        (case_id, kind), reason = next(iter(texts.failed.items()))
        raise LLMError(f"{len(texts.failed)} CoT texts failed, e.g. the {kind} CoT of {case_id}: {reason}; "
                       "finished texts are cached, re-run to ask for the rest")
    return texts


def main(argv=None):
    """The command line: build an experiment's CoT pool, or --show one case's cached texts."""
    parser = argparse.ArgumentParser(description="Build the CoT pool of an experiment.", allow_abbrev=False)
    parser.add_argument("--exp", required=True, help="experiment name, e.g. LA_8")
    flags = {"backend": "cot_backend", "url": "llm_url", "model": "llm_model", "cot_cache": "cot_cache",
             "temperature": "llm_temperature", "timeout": "llm_timeout", "workers": "llm_workers"}
    for flag, key in flags.items():  # each becomes a --key=value override, its type checked by get_config
        parser.add_argument(f"--{flag}", help=f"sets {key}")
    parser.add_argument("--vision", action="store_true", help="sets llm_vision: attach a montage of slices")
    parser.add_argument("--show", metavar="ID", help="print the cached texts of one case and exit")
    args, rest = parser.parse_known_args(argv)
    overrides = [f"--{key}={getattr(args, flag)}" for flag, key in flags.items()
                 if getattr(args, flag) is not None]
    cfg = get_config(args.exp, overrides + ["--llm_vision=True"] * args.vision + rest)
    if args.show:
        cache = CotCache(cache_path(cfg))
        records = sorted((r for r in cache.records.values() if r["case_id"] == args.show),
                         key=lambda r: str(r.get("created")))
        for r in records:  # cleaned: the file may hold what an endpoint sent, or what someone typed
            print(clean(f"--- {r['kind']} CoT | {r['backend']} | {r['model']} | prompt {r['prompt_hash']} | "
                        f"content {r['content_hash']} | {r.get('created')}\n{r['text']}"))
        return print(clean(f"{args.show}: {len(records)} cached texts in {cache.path}"))
    check_cache_writable(cfg)
    data.check_volume_cache_writable(cfg)    # before any data is written or read
    phantom.ensure_for(cfg)                  # a phantom experiment writes its data first
    # with references, prepare_data reads the test cases too: the pool describes every image
    split, volumes = data.prepare_data(replace(cfg, references=True))
    build_pool(cfg, split, volumes)


if __name__ == "__main__":
    sys.exit(cli(main))
