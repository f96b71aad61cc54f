"""The bottom layer (docs/design.md §2): the Config, named experiments, `--key=value` overrides checked by
type, the one-line errors (cli), the device and torchrun place, and every write: atomic, errors in words."""
import contextlib
import difflib
import errno
import fcntl
import math
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass
class Config:
    exp: str = "LA_8"                 # experiment name; outputs go to runs/<exp>
    data_root: str = "data/LA"        # the LA layout (docs/design.md §3; data.py)
    phantom: bool = False             # write a synthetic LA-layout dataset to data_root when it is missing
    phantom_shape: tuple = (96, 96, 64)   # the phantom's volume size (X, Y, Z)
    phantom_cases: tuple = (40, 10)   # the phantom's (train, test) case counts
    num_labeled: int = 8              # the first N IDs of train.list are labeled (LA_N)
    downsample: int = 1               # read volumes on a grid this many times coarser (block means; LA_8_LOW)
    cache_dir: str = "data/cache"     # coarser volumes kept here, keyed by file content and factor ("": none)
    val_cases: int = 0                # score the last N IDs of train.list, held out, in place of test.list
    patch_size: tuple = (112, 112, 80)  # training patch and sliding window, each side divisible by 16
    batch_size: int = 4               # patches per step
    labeled_bs: int = 2               # the first labeled_bs patches of a batch are labeled
    base_filters: int = 16            # V-Net width (16 in the LA protocol)
    n_classes: int = 2                # background and target
    dropout: float = 0.5              # Dropout3d at the bottleneck and before the heads
    references: bool = True           # decoder A fuses selected reference context (False: plain mean teacher)
    mcam_gates: bool = True           # coordinate-attention gates in MCAM (False: context added ungated)
    max_iters: int = 15000            # training iterations
    seed: int = 1337                  # the seed of weights, batches and noise
    lr: float = 0.01                  # SGD base learning rate, poly decay (power 0.9) to 0
    momentum: float = 0.9             # SGD momentum
    weight_decay: float = 1e-4        # SGD weight decay
    consistency: float = 1.0          # weight of the unlabeled losses after ramp-up (0: supervised only)
    rampup_iters: int = 6000          # sigmoid ramp-up length (the protocol's 40 x 150 iterations)
    sharpen_t: float = 0.1            # temperature of the sharpened consistency targets (1: soft targets)
    ema_decay: float = 0.99           # teacher = EMA of the student with this decay
    teacher_noise: float = 0.1        # std of the noise added to the teacher's input
    cot_backend: str = "auto"         # CoT writer (pool.py): "llm", "descriptors", "auto" (llm if llm_url)
    cot_cache: str = ""               # the CoT cache file; "" = <data_root>/cot_cache.jsonl
    llm_url: str = ""                 # an OpenAI-compatible server (http://localhost:8000)
    llm_model: str = ""               # the model that server runs
    llm_api_key_env: str = "CERS_API_KEY"  # name of the environment variable holding the API key
    llm_temperature: float = 0.2      # sampling temperature
    llm_timeout: float = 60.0         # seconds for a request
    llm_workers: int = 4              # requests in flight
    llm_retries: int = 5              # retries of a failed request
    llm_vision: bool = False          # attach a PNG montage of slices to each request
    modality: str = "late gadolinium-enhanced cardiac MRI"   # the imaging, as the CoT prompts name it
    anatomy: str = "heart"            # the organ imaged, as the prompts name it
    target: str = "left atrium"       # the structure segmented, as the prompts name it
    bank_stride: tuple = ()           # grid stride of the reference bank's crops; () = patch_size
    k_coarse: int = 32                # morphology neighbours per query
    k_fine: int = 4                   # references kept by the CoT filter
    tau: float = 0.6                  # normalised BM25 score under which a candidate is a hard negative
    max_refs_per_case: int = 1        # at most this many references from one case (diverse references)
    ref_temperature: float = 1.0      # softmax temperature of the reference weights
    retrieval: str = "both"           # "both": kNN, then CoT filter; "morph": kNN only; "random": at random
    bank_refresh: int = 200           # refresh the bank's features from the teacher every N iterations
    bank_momentum: float = 0.0        # EMA momentum of that refresh (0: the teacher's features replace them)
    stride_xy: int = 18               # sliding windows' stride in x and y
    stride_z: int = 4                 # sliding windows' stride in z
    window_batch: int = 8             # sliding windows per forward pass
    device: str = "auto"              # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    amp: bool = True                  # bf16 autocast + channels-last 3D on CUDA; channels-last fp32 on CPU
    compile: bool = False             # torch.compile the encoder and decoders (slow first steps, then faster)
    deterministic: bool = False       # deterministic kernels, no autotuning: a run repeats exactly here
    log_every: int = 20               # interval of the CSV log and the progress bar
    ckpt_every: int = 1000            # interval of checkpoints
    out_dir: str = ""                 # "" = runs/<exp>


EXPERIMENTS = {
    "LA_4": dict(num_labeled=4), "LA_8": dict(num_labeled=8), "LA_16": dict(num_labeled=16),
    # offline, CPU-sized (docs/design.md §4); 50 test cases, as paired comparisons on one network need them
    "PHANTOM_8": dict(data_root="data/phantom", phantom=True, phantom_shape=(48, 48, 32),
                      phantom_cases=(80, 50), patch_size=(32, 32, 32), base_filters=8, max_iters=1200,
                      rampup_iters=480, stride_xy=8, stride_z=8, ckpt_every=200, bank_refresh=50, lr=0.03),
    # real LA on 2 CPU cores on a 3x coarser grid, tuned on a validation split (docs/results.md §1.2)
    "LA_8_LOW": dict(downsample=3, patch_size=(48, 48, 32), base_filters=8, max_iters=1200, rampup_iters=480,
                     stride_xy=16, stride_z=8, ckpt_every=200, bank_refresh=100, lr=0.03, consistency=0.1,
                     sharpen_t=1.0),
}
HINTS = {f.name: f.type for f in fields(Config)}   # each key's type: str, int, float, bool or tuple (of ints)
RULES = [  # (keys, test, what the value must be); the keys not named here follow BY_TYPE
    ("phantom_shape", lambda v: len(v) == 3 and min(v) >= 16, "three sizes >= 16 voxels, e.g. 64,64,48"),
    ("phantom_cases", lambda v: len(v) == 2 and min(v) >= 1, "two counts >= 1 (train, test), e.g. 40,10"),
    ("patch_size", lambda v: len(v) == 3 and all(p > 0 and p % 16 == 0 for p in v),
     "three sides, each a positive multiple of 16, e.g. 112,112,80"),
    ("bank_stride", lambda v: len(v) == 3 and min(v) >= 1, "three strides >= 1, or empty for patch_size"),
    ("cache_dir cot_cache llm_model", lambda v: v == v.strip(), "text without spaces around it (or empty)"),
    ("val_cases rampup_iters llm_retries", lambda v: v >= 0, "a whole number >= 0"),
    ("seed", lambda v: 0 <= v < 2 ** 32, "a whole number in [0, 2^32)"),
    ("n_classes", lambda v: v == 2, "2 (background and target: the losses, CoTs and metrics are binary)"),
    ("lr llm_timeout ref_temperature", lambda v: 0 < v < math.inf, "a finite number > 0"),
    ("ema_decay tau bank_momentum", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("dropout momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("sharpen_t", lambda v: 0 < v <= 1, "a temperature in (0, 1] (1: no sharpening)"),
    ("llm_temperature", lambda v: 0 <= v <= 2, "a number in [0, 2]"),
    ("cot_backend", lambda v: v in ("auto", "llm", "descriptors"), "one of auto, llm, descriptors"),
    ("retrieval", lambda v: v in ("both", "morph", "random"), "one of both, morph, random"),
    ("llm_url", lambda v: v == "" or v.startswith(("http://", "https://")), "empty or an http(s):// URL"),
    ("llm_api_key_env", lambda v: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v), "an environment variable name"),
    ("device", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v), "auto, cpu, cuda, cuda:N or mps")]
CHECKS = {key: (test, what) for keys, test, what in RULES for key in keys.split()}
BY_TYPE = {bool: (lambda v: True, "true or false"), str: (lambda v: bool(v.strip()), "a non-empty text"),
           int: (lambda v: v >= 1, "a whole number >= 1"),
           float: (lambda v: 0 <= v < math.inf, "a number >= 0")}
BOOLS = {"true": True, "1": True, "false": False, "0": False}   # how --key=value spells a bool


class CersError(Exception):
    """Bad input or a refused operation, in one line naming the file, the key, the value (cli prints it)."""


class ConfigError(CersError, ValueError):
    """A config value, command-line flag or device that cannot work."""


def get_config(exp, overrides=()):
    """The named experiment's config with `--key=value` overrides parsed by the key's type, then checked."""
    if exp not in EXPERIMENTS:
        raise ConfigError(f"config: unknown experiment {exp!r}; known: {', '.join(EXPERIMENTS)}")
    cfg = Config(exp=exp, **EXPERIMENTS[exp])
    for item in overrides:
        key, eq, text = item.removeprefix("--").partition("=")
        if not eq or key not in HINTS:
            close = "".join(f" (did you mean --{k}=...?)" for k in difflib.get_close_matches(key, HINTS, 1))
            raise ConfigError(f"config: unknown or malformed argument {item!r}{close}; flags are never "
                              f"abbreviated, config keys are --key=value with a key of: {', '.join(HINTS)}")
        hint = HINTS[key]
        try:
            setattr(cfg, key, BOOLS[text.lower()] if hint is bool else hint(text) if hint is not tuple
                    else tuple(int(v) for v in text.split(",") if v.strip()))
        except (ValueError, KeyError):
            raise ConfigError(f"config: --{key}={text!r} is not a valid {hint.__name__}") from None
    return check_config(cfg)


def show(value):
    """A value as it is written on the command line (tuples as 2,3,4)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def has_type(value, hint):
    """True when value fits the field's type (an int where a float goes; a tuple of ints)."""
    if hint in (int, float):
        return isinstance(value, (int, hint)) and not isinstance(value, bool)
    return isinstance(value, hint) and (hint is not tuple or all(has_type(v, int) for v in value))


def check_config(cfg, origin=None):
    """Fill derived defaults, check each key (CHECKS, else BY_TYPE), then keys against each other; a
    ConfigError names the key, the value, what it must be, and origin (a checkpoint) for a saved config."""
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.exp}"
    cfg.bank_stride = cfg.bank_stride or cfg.patch_size
    for key, hint in HINTS.items():
        value, (test, what) = getattr(cfg, key), CHECKS.get(key) or BY_TYPE[hint]
        if not has_type(value, hint) or not test(value):
            raise ConfigError(f"{origin}: config entry {key}={value!r} must be {what}" if origin else
                              f"config: {key}={show(value)} must be {what}; set --{key}=...")
    where, patch = origin or "config", cfg.patch_size
    if cfg.labeled_bs > cfg.batch_size:
        raise ConfigError(f"{where}: labeled_bs={cfg.labeled_bs} exceeds batch_size={cfg.batch_size}")
    if cfg.stride_xy > min(patch[:2]) or cfg.stride_z > patch[2]:
        raise ConfigError(f"{where}: stride_xy={cfg.stride_xy}, stride_z={cfg.stride_z} leave gaps between "
                          f"test windows of patch_size={show(patch)}; use strides no larger than the patch")
    if cfg.cot_backend == "llm" and not (cfg.llm_url and cfg.llm_model):
        raise ConfigError(f"{where}: cot_backend=llm needs llm_url and llm_model (got {cfg.llm_url!r} and "
                          f"{cfg.llm_model!r})")
    return cfg


class Stop(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, in the main thread: every `finally` runs; the message says what was kept."""

    def __init__(self, signum=signal.SIGINT, message=""):
        super().__init__(message)
        self.signum = signal.Signals(signum)


def cli(main, argv=None):
    """Run main(argv) as a command: a CersError is one line on stderr and exit status 2, a Stop one line and
    128 + its signal (130, 143, 129), a bug its traceback; open progress bars are closed first."""
    def stop(signum, frame):
        raise Stop(signum)
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        main(argv)
        return 0
    except (CersError, KeyboardInterrupt) as e:   # KeyboardInterrupt: a Stop, or Ctrl-C before the handler
        for bar in sorted(getattr(tqdm, "_instances", ()), key=lambda bar: -abs(bar.pos)):   # innermost first
            bar.leave = True
            bar.close()
        signum = getattr(e, "signum", signal.SIGINT)
        line, status = (("error: " + str(e), 2) if isinstance(e, CersError) else
                        (f"stopped by {signum.name}" + (f": {e}" if str(e) else ""), 128 + signum))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    print(" ".join(line.splitlines()), file=sys.stderr)
    return status


def resolve_device(cfg):
    """The torch device of a checked config ("auto": cuda when available); one missing here is refused."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                          else cfg.device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"config: device={cfg.device} but PyTorch sees {torch.cuda.device_count()} CUDA "
                          "device(s) here; use --device=cpu or --device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"config: device={cfg.device} but MPS is not available here; use --device=cpu")
    return device


def fast_paths(cfg, device):
    """(bf16 autocast, channels-last 3D) for cfg.amp: bf16 on CUDA only (slower than fp32 on most CPUs)."""
    return cfg.amp and device.type == "cuda", cfg.amp


def precision(bf16, channels_last):
    """How a run computes, for the logs: 'bf16 autocast + channels-last 3D', 'fp32', ..."""
    return ("bf16 autocast" if bf16 else "fp32") + (" + channels-last 3D" if channels_last else "")


@dataclass
class World:
    """This process's place among the training processes: one, or torchrun's N (one per GPU)."""
    rank: int = 0
    size: int = 1
    main = property(lambda self: self.rank == 0)       # the process that writes logs, checkpoints and caches


def init_world(cfg):
    """This process's place (torchrun's RANK...; NCCL on CUDA, gloo on CPUs) and device. cfg.deterministic
    turns cuDNN autotuning off (timings vary), fixes the cuBLAS workspace, warns of ops with none."""
    device = resolve_device(cfg)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if cfg.deterministic or torch.are_deterministic_algorithms_enabled():   # the call imports the compiler
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), device


def main_process():
    """Rank 0 under torchrun (read from its environment, also after the process group is gone), else True."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def main_first(world):
    """Rank 0 runs the block (writes the phantom, the CoT cache) first; the other ranks then find it done."""
    if world.size > 1 and not world.main:
        dist.barrier()
    yield
    if world.size > 1 and world.main:
        dist.barrier()

CAUSES = {  # errno: the cause in words, with what to do
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EFBIG: "file too large for a file-size limit (ulimit -f) or the file system; write elsewhere",
    errno.EACCES: "permission denied; write elsewhere or make the folder writable",
    errno.EPERM: "operation not permitted; write elsewhere or make the folder writable",
    errno.EROFS: "the file system is read-only; write elsewhere"}


class WriteError(CersError):
    """A file or folder that cannot be written; the message names it and says why in words."""


@contextlib.contextmanager
def writing(path):
    """OS errors in the block become a WriteError naming `path` and the cause in words."""
    try:
        yield
    except OSError as e:
        why = CAUSES.get(e.errno) or (e.strerror or str(e)).rstrip(".").lower()
        if e.errno in (errno.ENOTDIR, errno.EEXIST):   # mkdir through or onto a file: name that file
            files = [p for p in [Path(path), *Path(path).parents] if p.exists() and not p.is_dir()]
            why = f"{files[0]} is a file, not a folder; remove it or write elsewhere" if files else why
        raise WriteError(f"{path}: cannot write it: {why}") from e


def temp_path(path):
    """A temp name beside `path` that no other process uses: .<name>.<pid>.<random>.tmp."""
    return Path(path).with_name(f".{Path(path).name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


@contextlib.contextmanager
def replacing(path):
    """Yield a temp path beside `path` to write; it replaces `path` in one step if the block succeeds."""
    path, tmp = Path(path), temp_path(path)
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:                                           # on any error or interruption `path` stays as it was
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes(path, data):
    """Write `data` to `path` atomically, on the disk before it takes the name (survives a power cut)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path, text):
    """Write `text` to `path` atomically (write_bytes)."""
    write_bytes(path, text.encode())


def save_figure(fig, path, **kwargs):
    """fig.savefig(path) atomically, the format from the file's suffix."""
    with replacing(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs)


@contextlib.contextmanager
def appending(path):
    """The text file at `path` opened for appending (a log); OS errors become a WriteError naming it."""
    with writing(path), open(path, "a", newline="", encoding="utf-8") as f:
        yield f


def make_folder(path):
    """Create the folder `path` with its parents (WriteError if it cannot be) and return it."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def remove_stale_temps(folder):
    """Remove the temp files and folders (temp_path's names) in `folder` of processes no longer running."""
    for p in Path(folder).glob(".*.tmp"):
        m = re.fullmatch(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp", p.name)   # group 1: the writer's PID
        if not m or int(m[1]) == os.getpid():
            continue
        try:
            os.kill(int(m[1]), 0)                      # signal 0: only asks whether the writer still runs
        except ProcessLookupError:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        except PermissionError:                        # another user's process: it runs
            pass


def check_writable(folder):
    """Create `folder`, write a probe there before any data are read (fail at once), clear dead temps."""
    folder = make_folder(folder)
    with writing(folder), tempfile.TemporaryFile(dir=folder) as probe:    # nameless: nothing is left behind
        probe.write(b"probe")
    remove_stale_temps(folder)
    return folder


class Lock:
    """An exclusive flock on the file `path`, holding the holder's PID: one process at a time. The kernel
    drops it when its process dies (then taken over); release removes the file and the folders made for it.
    While held elsewhere: wait (busy None) or raise WriteError(busy), "{pid}" replaced by the holder's PID
    (not str.format: paths stay as they are)."""

    def __init__(self, path, busy=None):
        self.path, self.busy = Path(path), busy

    def holder(self):
        """The PID written in the open lock file, or None."""
        text = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None

    def __enter__(self):
        path, folder = self.path, self.path.parent
        self.made = [p for p in [folder, *folder.parents] if not p.exists()]   # made here, lowest first
        make_folder(folder)
        with writing(path):
            while True:                                # until the file locked is still the one at `path`
                self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    try:
                        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        pid = self.holder() or "unknown"
                        if self.busy is not None:
                            raise WriteError(self.busy.replace("{pid}", str(pid))) from None
                        print(f"waiting for process {pid}, which holds {path}", file=sys.stderr)
                        fcntl.flock(self.fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(self.fd)
                    raise
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_ino == os.fstat(self.fd).st_ino:
                        break
                os.close(self.fd)                      # its holder removed the file as this one opened it
            holder = self.holder()
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        if holder and holder != os.getpid():
            print(f"note: {path} was held by process {holder}, which ended without releasing it; taken over",
                  file=sys.stderr)
        remove_stale_temps(folder)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.path.unlink()                         # while locked: a waiting process then sees a new file
        os.close(self.fd)
        with contextlib.suppress(OSError):             # up to the first folder that is not empty
            for folder in self.made:
                folder.rmdir()
