"""The one place for experiment settings: the Config dataclass, the named experiments, `--key=value`
overrides checked by type, and the checks a config must pass (docs/design.md §2).

Every entry point (train.py, test.py, pool.py, explain.py, bench.py) reads its config from here
(docs/design.md §3 for the LA protocol the LA_N experiments follow, §4 for the offline PHANTOM_8):

    cfg = get_config("LA_8", ["--max_iters=2000", "--k_fine=2"])

The resolved config is printed at the start of training and stored in every checkpoint; test.py
rebuilds the network from the checkpoint's copy instead of re-typing arguments.

Bad input is refused early with a CersError (ConfigError here; DataError, CheckpointError, LLMError above)
whose message names the file, the key and the value; cli() shows it as one line on stderr, on a line of its
own even when a progress bar was open.
"""
import difflib
import math
import re
import signal
import sys
import typing
from dataclasses import dataclass

import torch
from tqdm import tqdm

CASE_DIR = "2018LA_Seg_Training Set"  # the LA layout: <data_root>/<CASE_DIR>/<ID>/<CASE_FILE> (with spaces)
CASE_FILE = "mri_norm2.h5"


@dataclass
class Config:
    exp: str = "LA_8"                 # experiment name; outputs go to runs/<exp>
    # data
    data_root: str = "data/LA"        # LA layout: <CASE_DIR>/<ID>/<CASE_FILE>, train.list, test.list
    phantom: bool = False             # write a synthetic LA-layout dataset to data_root when it is missing
    phantom_shape: tuple = (96, 96, 64)  # phantom volume size (X, Y, Z)
    phantom_cases: tuple = (40, 10)   # phantom (train, test) case counts
    num_labeled: int = 8              # the first N IDs of train.list are labeled (LA_N)
    downsample: int = 1               # read volumes on a grid this many times coarser (block means; LA_8_LOW)
    cache_dir: str = "data/cache"     # coarser volumes kept here, keyed by file content and factor ("": none)
    val_cases: int = 0                # hold the last N IDs of train.list out as a validation split, scored in
                                      # place of test.list (for tuning; 0 = the protocol, test.list scored)
    patch_size: tuple = (112, 112, 80)  # training patch and sliding window, each side divisible by 16
    batch_size: int = 4               # patches per step: labeled_bs labeled + the rest unlabeled
    labeled_bs: int = 2
    # network
    base_filters: int = 16            # V-Net width (16 in the LA protocol)
    n_classes: int = 2
    dropout: float = 0.5              # Dropout3d at the bottleneck and before the heads
    references: bool = True           # decoder A fuses reasoning-selected reference context (False: the plain
                                      # dual-decoder mean teacher)
    mcam_gates: bool = True           # coordinate-attention gates in MCAM (False: context added ungated)
    # optimisation
    max_iters: int = 15000            # training iterations
    lr: float = 0.01                  # SGD base learning rate, poly decay (power 0.9) to 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ema_decay: float = 0.99           # teacher = EMA of the student
    consistency: float = 1.0          # weight of the unlabeled losses after ramp-up (0: supervised only)
    rampup_iters: int = 6000          # sigmoid ramp-up length (the protocol's 40 x 150 iterations)
    sharpen_t: float = 0.1            # temperature of the sharpened consistency targets
    teacher_noise: float = 0.1        # std of the Gaussian noise on the teacher's input (clamped at 2 std)
    # the extensions beyond the paper (extensions.py), each off unless an experiment turns it on
    unlabeled_mix: bool = False       # the student sees pairs of unlabeled patches cut and mixed (CutMix),
                                      # the teacher's targets mixed alike (False: it sees them as they are)
    mix_labeled: bool = False         # each unlabeled patch is cut and mixed with a labeled one instead
                                      # (bidirectional copy-paste), its target the ground truth where the
                                      # labeled patch shows and the teacher's hard labels elsewhere, under the
                                      # supervised loss
    strong_view: bool = False         # the student sees the unlabeled patches blurred, bias-fielded, gamma-
                                      # changed and noisier than the teacher does (weak-to-strong consistency)
    strong_labeled: bool = False      # the labeled patches get that strong view too (appearance augmentation
                                      # of the supervised loss; a control: the strong view without labels)
    seed: int = 1337
    # knowledge pool (pool.py)
    cot_backend: str = "auto"         # "auto" | "llm" | "descriptors"; auto = llm when llm_url is set
    llm_url: str = ""                 # base URL of an OpenAI-compatible server, e.g. http://localhost:8000
    llm_model: str = ""
    llm_api_key_env: str = "CERS_API_KEY"  # name of the environment variable holding the API key
    llm_temperature: float = 0.2
    llm_timeout: float = 60.0         # seconds for a whole request
    llm_workers: int = 4              # requests in flight
    llm_retries: int = 5
    llm_vision: bool = False          # attach a PNG montage of slices to each request
    modality: str = "late gadolinium-enhanced cardiac MRI"
    anatomy: str = "heart"
    target: str = "left atrium"
    # reference selection (retrieve.py)
    bank_stride: tuple = ()           # grid stride of the bank crops; () = patch_size (no overlap)
    k_coarse: int = 32                # morphology neighbours per query
    k_fine: int = 4                   # references kept after the CoT-consistency filter
    tau: float = 0.6                  # normalised BM25 score under which a candidate is a hard negative
    max_refs_per_case: int = 1        # at most this many references from one case (diverse references)
    ref_temperature: float = 1.0      # softmax temperature of the reference weights
    ref_masks: bool = False           # references carry their masks into decoder A (an extension beyond
                                      # the paper)
    transfer_weight: float = 1.0      # with ref_masks: weight of the loss that teaches the fusion to
                                      # transfer labels
    ref_mask_detail: bool = False     # decoder A's MCAMs at 1/4 and 1/2 of the patch read the references'
                                      # weighted mask at their scale (ref_masks gives it to every MCAM)
    ref_align: bool = False           # bank crops centred on their label's centroid; each reference's mask
                                      # and features moved so that centroid lands on the query's predicted one
    ref_counterfactual: float = 0.0   # per step, the chance that the student's decoder A gets random
                                      # references or none (half and half) in place of the retrieved ones
    ref_proto_weight: float = 0.0     # weight of the loss in which the query's foreground and background
                                      # prototypes segment its references, scored on their masks
    retrieval: str = "both"           # "both" | "morph" | "cot" | "random"
    bank_momentum: float = 0.0        # EMA momentum of the bank feature refresh (0: the teacher's current
                                      # features, the teacher being an EMA already); the first always replaces
    ref_warmup: int = 0               # iterations before references are used (the path starts as the
                                      # identity)
    bank_refresh: int = 200           # refresh bank features from the teacher every this many iterations
    # testing
    stride_xy: int = 18               # sliding-window stride in x and y
    stride_z: int = 4                 # sliding-window stride in z
    window_batch: int = 8             # windows per forward pass at test time
    # runtime
    device: str = "auto"              # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    amp: bool = True                  # bf16 autocast + channels-last 3D on CUDA; channels-last fp32 on CPU
    compile: bool = False             # torch.compile the encoder and decoders (slow first steps, then faster)
    log_every: int = 20               # CSV log and progress-bar interval
    ckpt_every: int = 1000            # checkpoint interval
    out_dir: str = ""                 # "" = runs/<exp>


class CersError(Exception):
    """Bad input or a refused operation (config, data, checkpoint, endpoint). The message names the file, the
    key and the value and says what to do; entry points print it alone (cli). Any other exception is a bug."""


class ConfigError(CersError, ValueError):
    """A config value, command-line flag or device that cannot work."""


class Stop(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, raised in the main thread wherever it was, so every `finally` runs and no
    temp file stays; the message says what was kept. cli ends with it on one line and exit status 128 + the
    signal (130, 143)."""

    def __init__(self, signum=signal.SIGINT, message=""):
        super().__init__(message)
        self.signum = signal.Signals(signum)


def stop(signum, frame):
    raise Stop(signum)


def cli(main, argv=None):
    """Run an entry point's main(argv) as a command: a CersError becomes one line on stderr and exit status 2,
    Ctrl-C or SIGTERM one line and 130 or 143; any other exception is a bug and keeps its traceback. The line
    is printed once the failed call's frames are gone, so a progress bar they close comes before it."""
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    line, status = None, 0
    try:
        main(argv)
    except CersError as e:
        close_progress_bars()                          # while the failed call's bars are still open
        line, status = "error: " + str(e), 2
    except KeyboardInterrupt as e:                     # a Stop, or Ctrl-C before the handler was set
        close_progress_bars()
        signum = getattr(e, "signum", signal.SIGINT)
        line, status = f"stopped by {signum.name}" + (f": {e}" if str(e) else ""), 128 + signum
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if line:
        print(" ".join(line.splitlines()), file=sys.stderr)
    return status


def close_progress_bars():
    """Close the progress bars an error left open, each keeping its last state on its own line: the error's
    message then starts a line of its own (else it lands on the bar's line, and the bar's clean-up follows
    it)."""
    for bar in sorted(getattr(tqdm, "_instances", ()), key=lambda bar: -abs(bar.pos)):   # innermost first
        bar.leave = True
        bar.close()


def la(n):
    return dict(num_labeled=n)


EXPERIMENTS = {
    "LA_4": la(4), "LA_8": la(8), "LA_16": la(16),
    # CPU-sized offline default (docs/design.md §4): small synthetic volumes (48 x 48 x 32, about 2.1 mm),
    # 8 of 80 training cases labeled as in LA_8, a narrower V-Net, 32^3 patches, 1200 iterations. The
    # unlabeled losses at full weight, through cut-and-mixed unlabeled patches that the student sees in a
    # strong view (what each adds, and the run time: docs/results.md §1.1, §2.1, §3.1). 50 test cases:
    # paired comparisons on one network, such as decoder A with retrieved against random references, need them
    "PHANTOM_8": dict(data_root="data/phantom", phantom=True, phantom_shape=(48, 48, 32),
                      phantom_cases=(80, 50), num_labeled=8, patch_size=(32, 32, 32), base_filters=8,
                      max_iters=1200, rampup_iters=480, stride_xy=8, stride_z=8, log_every=20, ckpt_every=200,
                      bank_refresh=50, lr=0.03, consistency=1.0, unlabeled_mix=True, strong_view=True),
    # real LA on 2 CPU cores: the LA_8 split read on a 3x coarser grid (1.9 mm voxels, volumes about
    # 49-81 x 44-53 x 29), 8 filters, 48 x 48 x 32 patches, 1200 iterations, consistency 0.1 on soft (not
    # sharpened) teacher targets: chosen on a validation split (docs/results.md §1.2); scored on that grid
    # and the original one
    "LA_8_LOW": dict(num_labeled=8, downsample=3, patch_size=(48, 48, 32), base_filters=8, max_iters=1200,
                     rampup_iters=480, stride_xy=16, stride_z=8, log_every=20, ckpt_every=200,
                     bank_refresh=100, lr=0.03, consistency=0.1, sharpen_t=1.0),
}


def parse_value(key, text, hint):
    """Turn an override string into the field's type, or raise with the key and the value."""
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if hint is tuple:
            return tuple(int(v) for v in text.split(",") if v.strip())
        return hint(text)
    except ValueError:
        raise ConfigError(f"config: --{key}={text!r} is not a valid {hint.__name__}") from None


def get_config(exp, overrides=()):
    """The named experiment's config with `--key=value` overrides applied (unknown keys are errors)."""
    if exp not in EXPERIMENTS:
        raise ConfigError(f"config: unknown experiment {exp!r}; known: {', '.join(EXPERIMENTS)}")
    cfg = Config(exp=exp, **EXPERIMENTS[exp])
    hints = typing.get_type_hints(Config)
    for item in overrides:
        key, eq, text = item.removeprefix("--").partition("=")
        if not eq or key not in hints:
            close = difflib.get_close_matches(key, hints, 1)
            raise ConfigError(f"config: unknown or malformed argument {item!r}"
                              + (f" (did you mean --{close[0]}=...?)" if close else "")
                              + f"; flags are never abbreviated, config keys are --key=value with a key of: "
                              f"{', '.join(hints)}")
        setattr(cfg, key, parse_value(key, text, hints[key]))
    return check_config(cfg)


finite = math.isfinite
count = (lambda v: v >= 1, "a whole number >= 1")
name = (lambda v: bool(v.strip()), "a non-empty text")
flag = (lambda v: True, "true or false")                    # the type check is the whole check
fraction = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
positive = (lambda v: finite(v) and v > 0, "a finite number > 0")
non_negative = (lambda v: finite(v) and v >= 0, "a finite number >= 0")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
CHECKS = {  # key: (test, what the value must be); every key of Config, applied by check_config
    "exp": name, "data_root": name, "out_dir": name, "phantom": flag,
    "phantom_shape": (lambda v: len(v) == 3 and min(v) >= 16,
                      "three sizes of at least 16 voxels, e.g. 64,64,48"),
    "phantom_cases": (lambda v: len(v) == 2 and min(v) >= 1, "two counts >= 1 (train, test), e.g. 40,10"),
    "downsample": count, "cache_dir": (lambda v: v == v.strip(), "a folder, or empty for no cache"),
    "val_cases": (lambda v: v >= 0, "a whole number >= 0 (IDs held out of train.list)"),
    "num_labeled": (lambda v: v >= 1, "a count >= 1 (and at most the IDs in train.list)"),
    "patch_size": (lambda v: len(v) == 3 and all(p > 0 and p % 16 == 0 for p in v),
                   "three sides, each a positive multiple of 16, e.g. 112,112,80"),
    "batch_size": count, "labeled_bs": count, "base_filters": count,
    "n_classes": (lambda v: v == 2, "2 (background and target: the losses, CoTs and metrics are binary)"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "references": flag, "mcam_gates": flag,
    "max_iters": count, "lr": positive, "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": non_negative, "ema_decay": fraction, "consistency": non_negative,
    "rampup_iters": (lambda v: v >= 0, "a whole number >= 0"),
    "sharpen_t": (lambda v: 0 < v <= 1, "a temperature in (0, 1] (1: no sharpening)"),
    "teacher_noise": non_negative, "unlabeled_mix": flag, "mix_labeled": flag, "strong_view": flag,
    "strong_labeled": flag,
    "seed": (lambda v: 0 <= v < 2 ** 32, "a whole number in [0, 2^32)"),
    "cot_backend": (lambda v: v in ("auto", "llm", "descriptors"), "one of auto, llm, descriptors"),
    "llm_url": (lambda v: v == "" or v.startswith(("http://", "https://")), "empty or an http(s):// URL"),
    "llm_model": (lambda v: v == v.strip(), "a model name without surrounding spaces"),
    "llm_api_key_env": (lambda v: re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v), "an environment variable name"),
    "llm_temperature": (lambda v: 0 <= v <= 2, "a number in [0, 2]"), "llm_timeout": positive,
    "llm_workers": count, "llm_retries": (lambda v: v >= 0, "a whole number >= 0"),
    "llm_vision": flag, "modality": name, "anatomy": name, "target": name,
    "bank_stride": (lambda v: len(v) == 3 and min(v) >= 1, "three strides >= 1, or empty for patch_size"),
    "k_coarse": count, "k_fine": (lambda v: v >= 1, "a count >= 1 (references per query)"), "tau": fraction,
    "ref_temperature": positive, "retrieval": (lambda v: v in ("both", "morph", "cot", "random"),
                                               "one of both, morph, cot, random"),
    "max_refs_per_case": (lambda v: v >= 1, "a count >= 1 (references one case may give a query)"),
    "ref_masks": flag, "transfer_weight": non_negative, "ref_mask_detail": flag, "ref_align": flag,
    "ref_counterfactual": fraction, "ref_proto_weight": non_negative,
    "bank_momentum": fraction, "ref_warmup": (lambda v: v >= 0, "a whole number >= 0"), "bank_refresh": count,
    "stride_xy": count, "stride_z": count, "window_batch": count,
    "device": (lambda v: DEVICE.fullmatch(v), "auto, cpu, cuda, cuda:N or mps"),
    "amp": flag, "compile": flag, "log_every": count, "ckpt_every": count,
}


def show(value):
    """A value as it is written on the command line (tuples as 2,3,4)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def has_type(value, hint):
    """True when value fits the field's type (an int where a float goes; a tuple of ints)."""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) and (hint is not tuple or all(isinstance(v, int) for v in value))


def check_config(cfg):
    """Fill derived defaults, then check every key against its meaning (CHECKS) and the keys against each
    other; the first problem is a ConfigError naming the key, the value and what it must be."""
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.exp}"
    cfg.bank_stride = tuple(cfg.bank_stride) or tuple(cfg.patch_size)
    for key, hint in typing.get_type_hints(Config).items():
        value = getattr(cfg, key)
        test, what = CHECKS[key]
        if not has_type(value, hint) or not test(value):
            raise ConfigError(f"config: {key}={show(value)} must be {what}; set --{key}=...")
    problems = [
        (cfg.labeled_bs > cfg.batch_size, f"labeled_bs={cfg.labeled_bs} exceeds batch_size={cfg.batch_size}"),
        (cfg.stride_xy > min(cfg.patch_size[:2]) or cfg.stride_z > cfg.patch_size[2],
         f"stride_xy={cfg.stride_xy}, stride_z={cfg.stride_z} leave gaps between test windows of "
         f"patch_size={show(cfg.patch_size)}; use strides no larger than the patch"),
        (cfg.ref_masks and cfg.ref_mask_detail,
         "ref_masks gives every MCAM the references' mask already; ref_mask_detail is for runs without it"),
        (cfg.cot_backend == "llm" and not (cfg.llm_url and cfg.llm_model),
         f"cot_backend=llm needs llm_url and llm_model (got {cfg.llm_url!r} and {cfg.llm_model!r})"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(f"config: {message}")
    return cfg


def resolve_device(cfg):
    """The torch device of a checked config's device ("auto": cuda when available); a device this machine
    lacks is refused."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"config: device={cfg.device} but PyTorch sees {torch.cuda.device_count()} CUDA "
                          "device(s) here; use --device=cpu or --device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"config: device={cfg.device} but MPS is not available here; use --device=cpu")
    return device


def fast_paths(cfg, device):
    """(bf16 autocast, channels-last 3D layout) for cfg.amp on this device. bf16 on CUDA only: CPUs without
    bf16 units run it slower than fp32. Channels-last on both: the CPU step runs faster in it
    (docs/results.md §3.2)."""
    return cfg.amp and device.type == "cuda", cfg.amp


def precision(bf16, channels_last):
    """How a run computes, for the logs: 'bf16 autocast + channels-last 3D', 'fp32 + channels-last 3D',
    'fp32'."""
    return ("bf16 autocast" if bf16 else "fp32") + (" + channels-last 3D" if channels_last else "")

