"""The one place for experiment settings: the Config dataclass, the named experiments, `--key=value`
overrides checked by type, and the checks a config must pass (STYLE.md, "Config in one place").

Every entry point (train.py, test.py, pool.py, retrieve.py, bench.py) reads its config from here
(DESIGN.md §3 for the LA protocol the LA_N experiments follow, §4 for the offline PHANTOM_8):

    cfg = get_config("LA_8", ["--max_iters=2000", "--k_fine=2"])

The resolved config is printed at the start of training and stored in every checkpoint; test.py
rebuilds the network from the checkpoint's copy instead of re-typing arguments.
"""
import typing
from dataclasses import dataclass

import torch

CASE_DIR = "2018LA_Seg_Training Set"  # the LA layout: <data_root>/<CASE_DIR>/<ID>/<CASE_FILE> (spaces included)
CASE_FILE = "mri_norm2.h5"


@dataclass
class Config:
    exp: str = "LA_8"                 # experiment name; outputs go to runs/<exp>
    # data
    data_root: str = "data/LA"        # LA layout: '2018LA_Seg_Training Set/<ID>/mri_norm2.h5', train.list, test.list
    phantom: bool = False             # write a synthetic LA-layout dataset to data_root when it is missing
    phantom_shape: tuple = (96, 96, 64)  # phantom volume size (X, Y, Z)
    phantom_cases: tuple = (40, 10)   # phantom (train, test) case counts
    num_labeled: int = 8              # the first N IDs of train.list are labeled (LA_N)
    patch_size: tuple = (112, 112, 80)  # training patch and sliding window, each side divisible by 16
    batch_size: int = 4               # patches per step: labeled_bs labeled + the rest unlabeled
    labeled_bs: int = 2
    # network
    base_filters: int = 16            # V-Net width (16 in the LA protocol)
    n_classes: int = 2
    dropout: float = 0.5              # Dropout3d at the bottleneck and before the heads
    references: bool = True           # decoder A fuses reasoning-selected reference context (False: plain dual-decoder MT)
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
    seed: int = 1337
    # knowledge pool (pool.py)
    cot_backend: str = "auto"         # "auto" | "llm" | "descriptors"; auto = llm when llm_url is set
    llm_url: str = ""                 # base URL of an OpenAI-compatible server, e.g. http://localhost:8000
    llm_model: str = ""
    llm_api_key_env: str = "CERS_API_KEY"  # name of the environment variable holding the API key
    llm_temperature: float = 0.2
    llm_timeout: float = 60.0         # seconds per request
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
    ref_masks: bool = False           # references carry their masks into decoder A (an extension beyond the paper)
    transfer_weight: float = 1.0      # with ref_masks: weight of the loss that teaches the fusion to transfer labels
    retrieval: str = "both"           # "both" | "morph" | "cot" | "random"
    bank_momentum: float = 0.9        # EMA momentum of the bank feature refresh
    ref_warmup: int = 0               # iterations before references are used (the path starts as the identity)
    bank_refresh: int = 200           # refresh bank features from the teacher every this many iterations
    # testing
    stride_xy: int = 18               # sliding-window stride in x and y
    stride_z: int = 4                 # sliding-window stride in z
    window_batch: int = 8             # windows per forward pass at test time
    # runtime
    device: str = "auto"              # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    amp: bool = True                  # bf16 autocast + channels-last 3D on CUDA (fp32 on CPU)
    compile: bool = False             # torch.compile the encoder and decoders (slow first steps, then faster)
    log_every: int = 20               # CSV log and progress-bar interval
    ckpt_every: int = 1000            # checkpoint interval
    out_dir: str = ""                 # "" = runs/<exp>


def la(n):
    return dict(num_labeled=n)


EXPERIMENTS = {
    "LA_4": la(4), "LA_8": la(8), "LA_16": la(16),
    # CPU-sized offline default: small synthetic volumes, a narrower V-Net, a short schedule
    "PHANTOM_8": dict(data_root="data/phantom", phantom=True, phantom_shape=(64, 64, 48), num_labeled=8,
                      patch_size=(48, 48, 32), base_filters=8, max_iters=250, rampup_iters=100,
                      stride_xy=16, stride_z=8, log_every=10, ckpt_every=50, bank_refresh=25,
                      lr=0.03),
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
        raise SystemExit(f"config: --{key}={text!r} is not a valid {hint.__name__}") from None


def get_config(exp, overrides=()):
    """The named experiment's config with `--key=value` overrides applied (unknown keys are errors)."""
    if exp not in EXPERIMENTS:
        raise SystemExit(f"config: unknown experiment {exp!r}; known: {', '.join(EXPERIMENTS)}")
    cfg = Config(exp=exp, **EXPERIMENTS[exp])
    hints = typing.get_type_hints(Config)
    for item in overrides:
        key, eq, text = item.removeprefix("--").partition("=")
        if not eq or key not in hints:
            raise SystemExit(f"config: unknown or malformed override {item!r}; keys: {', '.join(hints)}")
        setattr(cfg, key, parse_value(key, text, hints[key]))
    return check_config(cfg)


def check_config(cfg):
    """Fill derived defaults and reject inconsistent settings early."""
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.exp}"
    cfg.bank_stride = tuple(cfg.bank_stride) or tuple(cfg.patch_size)
    if len(cfg.patch_size) != 3 or any(p % 16 for p in cfg.patch_size):
        raise SystemExit(f"config: patch_size {cfg.patch_size}: three sides, each divisible by 16")
    if not 0 < cfg.labeled_bs <= cfg.batch_size:
        raise SystemExit(f"config: need 0 < labeled_bs ({cfg.labeled_bs}) <= batch_size ({cfg.batch_size})")
    if cfg.retrieval not in ("both", "morph", "cot", "random"):
        raise SystemExit(f"config: retrieval={cfg.retrieval!r}; one of both, morph, cot, random")
    return cfg


def resolve_device(cfg):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)

