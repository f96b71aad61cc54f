"""Knowledge pool: chain-of-thought texts for every case (docs/design.md §4, §5).

CERS describes each scan in words before segmenting it: a reasoner writes a short chain of thought
(CoT) in four parts, `Texture: ... Boundary: ... Context: ... Summary: ...`. Labeled cases are
described with their mask (the "mask CoT"), every case also from the image alone (the "image CoT");
retrieve.py compares the texts with BM25 to drop references that look alike but reason differently.
Two back ends write the texts:

    llm          an OpenAI-compatible /v1/chat/completions endpoint (OpenAI, vLLM, Ollama, llama.cpp; llm.py),
                 prompted with prompts/*.txt filled in with the measured descriptors
    descriptors  offline and deterministic: the same four parts worded from the measured descriptors
                 through the thresholds in WORDING; the default when no endpoint is configured

Texts are cached in an append-only JSONL file, one record per (case, kind, back end, model, prompt
hash, content hash): a re-run asks nothing twice, texts of different reasoners or prompts never mix, and
a case whose image (or, for a mask CoT, mask) changed is described again.

    python pool.py --exp LA_8                                     # offline descriptors back end
    python pool.py --exp LA_8 --backend llm --url http://localhost:8000 --model NAME [--vision]
    python pool.py --exp LA_8 --show ID                           # print one case's cached texts
"""
import argparse
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

import data
import phantom
from config import CersError, cli, get_config
from llm import LLMClient, LLMError
from morphology import image_stats

# ----------------------------------------------------------------------------- prompts

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
KINDS = ("mask", "image")  # the mask CoT of a labeled case, the image-only CoT of any case
TEMPLATES = {"mask": "cot_mask.txt", "image": "cot_image.txt"}


def load_template(kind, prompt_dir=PROMPT_DIR):
    path = Path(prompt_dir) / TEMPLATES[kind]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt template for {kind} CoTs not found")
    return path.read_text(encoding="utf-8")


def render_prompt(template, values):
    """The template with each {name} replaced; an unknown placeholder is an error naming it."""
    def fill(match):
        if match.group(1) not in values:
            raise KeyError(f"prompt template has placeholder {{{match.group(1)}}}; "
                           f"known: {', '.join(sorted(values))}")
        return str(values[match.group(1)])
    return re.sub(r"\{(\w+)\}", fill, template)


def prompt_hash(template, context, vision=False):
    """Names a prompt in the cache: a changed template, modality, anatomy, target or image makes new
    records."""
    fixed = render_prompt(template, {**context, "descriptors": "{descriptors}"})
    return hashlib.sha256((fixed + ("\n[vision]" if vision else "")).encode()).hexdigest()[:12]

# ----------------------------------------------------------------------------- the descriptors back end

WRITER = "descriptors-v1"  # the model name this back end records; bump it when the wording changes
# statistic: ((low, high) cut points, wording below low / in between / at or above high). The cut points
# sit at about the tertiles of the 80 LA training cases, so on LA each phrase describes a third of them.
WORDING = {
    "heterogeneity": ((0.33, 0.40), ("Homogeneous", "Mildly heterogeneous", "Markedly heterogeneous")),
    "target_heterogeneity": ((0.26, 0.32), ("Homogeneous", "Mildly heterogeneous", "Markedly heterogeneous")),
    "noise": ((0.13, 0.175), ("minimal noise", "moderate noise", "prominent noise")),
    "contrast": ((2.9, 3.2), ("bright structures are only slightly brighter than the tissue around them",
                              "moderate contrast between bright structures and tissue",
                              "bright structures stand out clearly from darker tissue")),
    "target_contrast": ((0.05, 0.25), ("it is barely brighter than its immediate surroundings",
                                       "moderate contrast against the {wall}",
                                       "it stands out clearly against the {wall}")),
    "edge_sharpness": ((0.75, 0.88), ("Blurred, low-gradient", "Moderately defined", "Sharp, well-defined")),
    "boundary_sharpness": ((0.65, 0.80), ("Blurred, low-gradient", "Moderately defined",
                                          "Sharp, well-defined")),
    "target_sphericity": ((0.67, 0.72), ("lobulated, irregular", "mildly lobulated", "smooth, compact")),
    "lookalike_contact": ((0.50, 0.66), ("the {wall} separates it from most neighbours",
                                         "in places it opens into neighbouring {signal} "
                                         "without a visible wall",
                                         "much of its border opens into neighbouring {signal} "
                                         "with no visible wall")),
    "lookalike_share": ((0.72, 0.80), ("A minority", "Much", "Most")),
    "largest_share": ((0.93, 0.975), ("the bright regions stay mostly separate",
                                      "most bright regions join into a connected {signal}",
                                      "the bright regions merge into one {signal}, "
                                      "so borders must be inferred")),
    "bright_structures": ((3, 5), ("few", "several", "many")),
    "bright_fraction": ((0.18, 0.24), ("in a small part", "in a moderate part", "across much")),
}
COT = {  # the first three parts; the Summary names the difficulties below
    "mask": "Texture: {target_heterogeneity} {signal} in the {target} with {noise}; {target_contrast}.\n"
            "Boundary: {boundary_sharpness} margins with a {target_sphericity} contour; "
            "{lookalike_contact}.\n"
            "Context: {lookalike_share} of the bright tissue lies outside the {target}; "
            "the {neighbours} share its intensity and {bright_structures} separate bright structures "
            "compete with it.\n",
    "image": "Texture: {heterogeneity} bright {signal} on {modality} with {noise}; {contrast}.\n"
             "Boundary: {edge_sharpness} edges of bright structures; {largest_share}.\n"
             "Context: There are {bright_structures} separate bright structures {bright_fraction} "
             "of the field of view; the {neighbours} share the {signal} intensity and may mimic "
             "the {target}.\n",
}
DIFFICULTY = {  # statistic: (the difficulty it stands for, the level at which it is one), in order of weight
    "mask": {"target_contrast": ("weak contrast with its surroundings", 0),
             "boundary_sharpness": ("blurred margins", 0),
             "lookalike_contact": ("bright neighbours merging with it", 2),
             "target_heterogeneity": ("uneven internal signal", 2), "noise": ("image noise", 2)},
    "image": {"contrast": ("weak contrast", 0), "edge_sharpness": ("blurred edges", 0),
              "largest_share": ("one merged bright pool", 2),
              "bright_structures": ("many look-alike structures", 2),
              "heterogeneity": ("uneven signal", 2), "noise": ("image noise", 2)},
}
# how the writer names the parts of a target it knows; other targets get the generic words
VOCAB = {"left atrium": {"signal": "blood pool", "wall": "thin atrial wall",
                         "neighbours": "pulmonary veins, appendage, aortic root and left ventricle"}}
GENERIC = {"signal": "signal", "wall": "surrounding tissue", "neighbours": "adjacent {anatomy} structures"}


def write_cot(stats, kind, modality, anatomy, target):
    """A four-part CoT worded from image_stats() through WORDING: deterministic, about 128 tokens, no
    numbers."""
    vocab = {k: w.format(anatomy=anatomy) for k, w in VOCAB.get(target.lower(), GENERIC).items()}
    levels = {k: int(stats[k] >= lo) + int(stats[k] >= hi)
              for k, ((lo, hi), _) in WORDING.items() if k in stats}
    words = {k: WORDING[k][1][lv].format(**vocab) for k, lv in levels.items()}
    hard = [why for k, (why, at) in DIFFICULTY[kind].items() if levels[k] == at]
    overall = ("Clearly depicted" if len(hard) <= 1 else "Moderately challenging" if len(hard) == 2
               else "Challenging")
    reason = " and ".join(hard[:2]) or f"following its full extent within the {anatomy}"
    return (COT[kind].format(modality=modality, target=target, **vocab, **words)
            + f"Summary: {overall} {target} whose main segmentation difficulty is {reason}.")

# ----------------------------------------------------------------------------- the llm back end's picture

RENDER_LOCK = threading.Lock()  # matplotlib is not thread-safe; montages are drawn one at a time


def montage_png(image, mask=None):
    """PNG bytes of four slices (three axial levels, one coronal), the mask outlined in red when given.

    With a mask (labeled cases) the slices go through the target; without one (every image-only
    CoT) through the volume centre, where LA crops put the atrium. Drawn on matplotlib's Agg canvas
    directly, so the pyplot backend is never touched."""
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

# ----------------------------------------------------------------------------- the cache


def content_hash(image, mask=None):
    """Names what a text describes: the image's voxels (and the mask's, for a mask CoT), shape included."""
    digest = hashlib.sha256()
    for array, dtype in ((image, np.float32), (mask, np.uint8)):
        if array is not None:
            array = np.ascontiguousarray(array, dtype)
            digest.update(repr(array.shape).encode() + array.data)
    return digest.hexdigest()[:16]


class CacheError(CersError, OSError):
    """The CoT cache cannot be read or written; the message names the file and the cause."""


def cache_path(cfg):
    return Path(cfg.data_root) / "cot_cache.jsonl"


def check_cache_writable(cfg):
    """Refuse a CoT cache that could not be written, before any data are read: an existing cache file must
    open for appending, otherwise its nearest existing folder must take a new file (the build creates the
    rest). Probes with a nameless temporary file, so nothing is left behind. Returns the cache's path."""
    path = cache_path(cfg)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if path.exists():
            open(path, "ab").close()
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise CacheError(f"{path}: the CoT cache cannot be written ({e.strerror or e}); "
                         "make its folder writable or set --data_root") from None
    return path


def valid_record(record):
    """True for a dict with every key field and the text, each a non-empty string, and a known kind."""
    return (isinstance(record, dict) and record.get("kind") in KINDS
            and all(isinstance(record.get(k), str) and record[k] for k in (*CotCache.KEY, "text")))


class CotCache:
    """Append-only JSONL of CoT records keyed by (case_id, kind, backend, model, prompt_hash,
    content_hash); the newest wins.

    Each record is one line appended with fsync; a write that fails is cut back, so the file holds complete
    records only and a crash loses at most the line being written. Damaged lines (torn, not JSON, or JSON
    of the wrong shape) are skipped with one warning that counts them, and their texts are asked for again."""
    KEY = ("case_id", "kind", "backend", "model", "prompt_hash", "content_hash")

    def __init__(self, path):
        self.path, self.records = Path(path), {}
        try:
            raw = self.path.read_bytes() if self.path.exists() else b""
        except OSError as e:
            raise CacheError(f"{self.path}: the CoT cache cannot be read ({e.strerror or e})") from None
        self.torn, damaged = bool(raw) and not raw.endswith(b"\n"), []
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if valid_record(record):
                self.records[tuple(record[k] for k in self.KEY)] = record
            else:
                damaged.append(number)
        if damaged:
            lines = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
            warnings.warn(f"{self.path}:{damaged[0]}: skipping {len(damaged)} damaged cache record(s) (line "
                          f"{lines}; an interrupted write or an edit?); their texts are asked for again")

    def get(self, *key):
        return self.records[key]["text"] if key in self.records else None

    def add(self, case_id, kind, backend, model, prompt_hash, content_hash, text):
        key = (case_id, kind, backend, model, prompt_hash, content_hash)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {**dict(zip(self.KEY, key)), "created": created, "text": text}
        line = (("\n" if self.torn else "") + json.dumps(record, ensure_ascii=False) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab", buffering=0) as f:
                start = f.seek(0, os.SEEK_END)
                try:
                    view = memoryview(line)
                    while view:  # a raw write may take only part of the line
                        view = view[f.write(view):]
                    os.fsync(f.fileno())
                except OSError:
                    f.truncate(start)  # keep complete records only
                    raise
        except OSError as e:
            raise CacheError(f"{self.path}: cannot add a CoT text to the cache ({e.strerror or e}); "
                             f"the {len(self.records)} texts cached so far are kept; re-run") from None
        self.torn, self.records[key] = False, record

# ----------------------------------------------------------------------------- building the pool


@dataclass
class Job:
    """One text to write: the mask CoT of a labeled case, or the image-only CoT of any case (no mask
    at all)."""
    case_id: str
    kind: str
    image: np.ndarray
    mask: np.ndarray = None

    def __post_init__(self):
        if self.kind not in KINDS or (self.kind == "mask") != (self.mask is not None):
            given = "with" if self.mask is not None else "without"
            raise ValueError(f"{self.case_id}: a CoT job is ('mask', with a mask) or ('image', which takes "
                             f"no mask), got {self.kind!r} {given} a mask")
        self.content_hash = content_hash(self.image, self.mask)


@dataclass
class CotTexts:
    mask: dict = field(default_factory=dict)    # labeled case ID -> mask CoT
    image: dict = field(default_factory=dict)   # case ID -> image-only CoT
    cached: int = 0                             # texts read from the cache
    new: int = 0                                # texts written in this run
    failed: dict = field(default_factory=dict)  # (case ID, kind) -> reason; not cached, asked again next run


def build_cots(jobs, cache, backend, context, client=None, vision=False, workers=1, prompt_dir=PROMPT_DIR,
               progress=True):
    """The texts of `jobs` (Job): cached ones read, the others written by `workers` threads and cached as
    they finish.

    `context` gives the prompts' modality, anatomy and target; `client` (an LLMClient) is needed
    by the llm back end only, and `vision` attaches a montage to its prompts."""
    if backend not in ("llm", "descriptors") or (backend == "llm") != (client is not None):
        raise ValueError(f"back end {backend!r} with client {client!r}: "
                         "llm needs an LLMClient, descriptors none")
    vision = vision and backend == "llm"
    model = client.model if backend == "llm" else WRITER
    templates = {k: load_template(k, prompt_dir) for k in KINDS}
    hashes = {k: prompt_hash(templates[k], context, vision) for k in KINDS}

    def write(job):
        stats = image_stats(job.image, job.mask)
        if backend == "descriptors":
            return write_cot(stats, job.kind, **context)
        prompt = render_prompt(templates[job.kind], {**context, "descriptors": "\n".join(
            f"- {k}: {v:.3g}" for k, v in stats.items())})
        return client.ask(prompt, montage_png(job.image, job.mask) if vision else None)

    texts, todo = CotTexts(), []
    for job in jobs:
        text = cache.get(job.case_id, job.kind, backend, model, hashes[job.kind], job.content_hash)
        if text is None:
            todo.append(job)
        else:
            getattr(texts, job.kind)[job.case_id], texts.cached = text, texts.cached + 1
    executor = ThreadPoolExecutor(max(1, workers))
    try:
        futures = {executor.submit(write, job): job for job in todo}
        bar = tqdm(as_completed(futures), total=len(futures), desc=f"CoT texts ({backend})",
                   disable=not progress)
        for future in bar:
            job = futures[future]
            try:
                text = future.result()
            except LLMError as e:
                texts.failed[(job.case_id, job.kind)] = str(e)
                continue
            cache.add(job.case_id, job.kind, backend, model, hashes[job.kind], job.content_hash, text)
            getattr(texts, job.kind)[job.case_id], texts.new = text, texts.new + 1
    finally:
        executor.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, drop what has not started
    return texts


def resolve_backend(cfg):
    """cfg.cot_backend, where "auto" means llm when an endpoint is configured and descriptors otherwise
    (config.check_config has refused other values, and llm without llm_url and llm_model)."""
    if cfg.cot_backend != "auto":
        return cfg.cot_backend
    if not cfg.llm_url:
        print("pool: no LLM endpoint configured (llm_url is empty): "
              "CoT texts come from the offline descriptors back end")
    return "llm" if cfg.llm_url else "descriptors"


def build_pool(cfg, split, volumes, progress=True):
    """Mask CoTs of the labeled cases and image-only CoTs of every case, writing what the cache lacks.

    `volumes` maps ID -> (image, label); only the labeled cases' labels are read, so unlabeled and
    test masks are never measured, rendered or sent. Raises LLMError after the build when texts
    failed (the finished ones are cached, so a re-run asks only for the rest), CacheError when the cache
    cannot be written (check_cache_writable checks that before the data are read)."""
    backend, client = resolve_backend(cfg), None
    if backend == "llm":
        key = os.environ.get(cfg.llm_api_key_env, "")
        if not key:
            print(f"pool: environment variable {cfg.llm_api_key_env} is empty: "
                  "sending requests without an API key")
        client = LLMClient(cfg.llm_url, cfg.llm_model, key, cfg.llm_temperature, cfg.llm_timeout,
                           cfg.llm_retries)
    elif cfg.llm_vision:
        print("pool: llm_vision has no effect on the descriptors back end")
    jobs = [Job(i, "mask", volumes[i][0], volumes[i][1]) for i in split.labeled]
    jobs += [Job(i, "image", volumes[i][0]) for i in [*split.labeled, *split.unlabeled, *split.test]]
    path = cache_path(cfg)
    context = {"modality": cfg.modality, "anatomy": cfg.anatomy, "target": cfg.target}
    cache = CotCache(path)
    texts = build_cots(jobs, cache, backend, context, client, cfg.llm_vision, cfg.llm_workers,
                       progress=progress)
    print(f"pool: {texts.cached} cached, {texts.new} new, {len(texts.failed)} failed "
          f"({backend}, model {client.model if client else WRITER}, cache {path})")
    if texts.failed:
        (case_id, kind), reason = next(iter(texts.failed.items()))
        raise LLMError(f"{len(texts.failed)} CoT texts failed, e.g. the {kind} CoT of {case_id}: {reason}; "
                       "finished texts are cached, re-run to ask for the rest")
    return texts


def main(argv=None):
    """python pool.py --exp NAME [--backend llm --url URL --model NAME] [--vision] [--show ID]
    [--key=value ...]"""
    parser = argparse.ArgumentParser(description="Build the CoT knowledge pool of an experiment "
                                                 "(docs/design.md §5).", allow_abbrev=False)
    parser.add_argument("--exp", required=True, help="experiment name, e.g. LA_8")
    flags = {"backend": "cot_backend", "url": "llm_url", "model": "llm_model",  # short flag -> config key
             "temperature": "llm_temperature", "timeout": "llm_timeout", "workers": "llm_workers"}
    for flag, key in flags.items():
        parser.add_argument(f"--{flag}", help=f"sets {key}")
    parser.add_argument("--vision", action="store_true",
                        help="sets llm_vision: attach a PNG montage of slices")
    parser.add_argument("--show", metavar="ID", help="print the cached texts of one case and exit")
    args, rest = parser.parse_known_args(argv)
    # the flags become config overrides, so get_config checks their types like any other --key=value
    overrides = [f"--{key}={getattr(args, flag)}" for flag, key in flags.items()
                 if getattr(args, flag) is not None]
    cfg = get_config(args.exp, overrides + ["--llm_vision=True"] * args.vision + rest)
    if args.show:
        cache = CotCache(cache_path(cfg))
        records = sorted((r for r in cache.records.values() if r["case_id"] == args.show),
                         key=lambda r: str(r.get("created")))
        for r in records:
            print(f"--- {r['kind']} CoT | {r['backend']} | {r['model']} | prompt {r['prompt_hash']} | "
                  f"content {r['content_hash']} | {r.get('created')}\n{r['text']}")
        return print(f"{args.show}: {len(records)} cached texts in {cache.path}")
    check_cache_writable(cfg)
    data.check_volume_cache_writable(cfg)    # before any data is written or read
    phantom.ensure_for(cfg)                  # a phantom experiment writes its data first
    split, volumes = data.prepare_data(cfg)
    volumes.update(data.load_volumes(cfg.data_root, split.test, factor=cfg.downsample))
    build_pool(cfg, split, volumes)


if __name__ == "__main__":
    sys.exit(cli(main))
