"""Frozen configuration dataclasses: the one config system of the project.

Named recipes (``tiny``, ``demo``, ``paper``) live in ``jobs/recipes.py`` and are plain functions
returning a :class:`Recipe`. Checkpoints store their model config as JSON (``to_dict``) so a model can
be rebuilt with no outside config (``from_dict``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

ECG_FS = 250  # Hz: the rate every ECG is resampled to (what ST-MEM expects)
ECG_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# echo views a view-conditioned generator knows, by id (GeneratorConfig.num_views takes a prefix);
# any other view name is "unknown" (id -1: no view embedding)
ECHO_VIEWS = ("A4C", "A2C", "A3C", "A5C", "PLAX", "PSAX", "SUBCOSTAL", "OTHER")


def view_id(name: object, num_views: int = len(ECHO_VIEWS)) -> int:
    """The id of an echo view name (case-insensitive) among the first ``num_views`` of
    :data:`ECHO_VIEWS`, or -1 (unknown) for anything else, empty or missing."""
    key = str(name or "").strip().upper()
    return ECHO_VIEWS.index(key) if key in ECHO_VIEWS[:num_views] else -1


@dataclass(frozen=True)
class ClipConfig:
    """How ingestion cuts a study into clips (window mode).

    Attributes:
        frames: frames per clip (T); must be 1 + 2k for the tokenizer.
        size: output frame height = width in pixels.
        fps: frame rate the clip is resampled to.
        ecg_samples: ECG samples per clip at 250 Hz, starting at the clip's first frame.
        stride_s: hop between clip starts in seconds; ``None`` means the clip duration.
    """

    frames: int = 5
    size: int = 32
    fps: float = 5.0
    ecg_samples: int = 300
    stride_s: float | None = None

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.frames - 1) % 2:
            raise ValueError(f"clip frames must be 1 + 2k, got {self.frames}")


PATCH_INPUTS = ("pixels", "normed", "normed+stats")


@dataclass(frozen=True)
class TokenizerConfig:
    """C-ViViT-style video tokenizer (first frame alone, then temporal patches of 2).

    Attributes:
        quantizer: ``"fsq"`` (default: no codebook to collapse, no auxiliary loss) or ``"vq"``
            (a learned codebook updated by EMA, with dead-code restart and a commitment loss).
        fsq_levels: FSQ levels per channel; the codebook is their product.
        vq_codebook_size: number of VQ codes.
        vq_dim: width of a VQ code.
        vq_ema_decay: EMA decay of the VQ codebook statistics per training step.
        vq_commitment_weight: weight of ``||z - sg(code)||^2`` in the tokenizer loss (VQ only).
        vq_restart_after: training steps a VQ code may go unused before it is re-initialised from
            an encoder output of the current batch (0: never).
        frame_local_encoder: encode every frame on its own (one embedding for all frames, no
            temporal position or attention in the encoder; the decoder keeps both), so a frame's
            token ids do not depend on the frames before it or on its place in the clip: the ids
            a window ends with are the ids the next window would encode from the same frame.
            Needs ``temporal_patch`` 1.
        patch_input: what a patch's embedding sees. ``"normed+stats"`` (default): its pixels
            layer-normalised, with their mean and standard deviation appended. ``"normed"``: the
            normalised pixels alone (C-ViViT's patch embedding, the only choice before 2026-12-05),
            which takes away each patch's brightness and contrast, so the encoder must guess them
            from the patches round it (what the phantom taught it, not what a real echo shows).
            ``"pixels"``: the pixels as they are (FSQ then uses few codes). A checkpoint saved
            without the field was built ``"normed"`` and loads so (docs/architecture.md,
            "Tokenizer patch embedding").
    """

    frames: int = 5
    image_size: int = 32
    patch_size: int = 8
    temporal_patch: int = 2
    dim: int = 64
    spatial_depth: int = 2
    temporal_depth: int = 1
    heads: int = 4
    fsq_levels: tuple[int, ...] = (5, 5, 5)
    quantizer: str = "fsq"
    vq_codebook_size: int = 512
    vq_dim: int = 8
    vq_ema_decay: float = 0.99
    vq_commitment_weight: float = 0.25
    vq_restart_after: int = 20
    frame_local_encoder: bool = False
    patch_input: str = "normed+stats"

    def __post_init__(self) -> None:
        if self.patch_input not in PATCH_INPUTS:
            raise ValueError(f"unknown tokenizer patch_input {self.patch_input!r}; known: {', '.join(PATCH_INPUTS)}")
        if self.quantizer not in ("fsq", "vq"):
            raise ValueError(f"unknown tokenizer quantizer {self.quantizer!r}; known: fsq, vq")
        if self.frame_local_encoder and self.temporal_patch != 1:
            raise ValueError(f"frame_local_encoder needs temporal_patch 1, got {self.temporal_patch}")

    @property
    def token_grid(self) -> tuple[int, int, int]:
        t = 1 + (self.frames - 1) // self.temporal_patch
        s = self.image_size // self.patch_size
        return (t, s, s)

    @property
    def code_dim(self) -> int:
        """Width of the quantized latent: ``len(fsq_levels)`` for FSQ, ``vq_dim`` for VQ."""
        return self.vq_dim if self.quantizer == "vq" else len(self.fsq_levels)

    @property
    def codebook_size(self) -> int:
        """Number of token ids (the generator's vocabulary)."""
        if self.quantizer == "vq":
            return self.vq_codebook_size
        n = 1
        for level in self.fsq_levels:
            n *= level
        return n


@dataclass(frozen=True)
class ECGEncoderConfig:
    """ST-MEM-style ViT over 12 leads (250 Hz); emits one token per (lead, patch).

    With ``dim = heads * 64`` and ``samples = 2250`` (patch 75) the layout matches an ST-MEM
    encoder, so :func:`echopulse.models.ecg_encoder.load_stmem_checkpoint` can load one
    (the released ST-MEM encoder is ViT-B/75: dim 768, depth 12, heads 12; ViT-S is 384/12/6).

    Attributes:
        checkpoint: path of an ST-MEM ``encoder.pth`` that training loads before the first step;
            a saved generator already holds the weights, so rebuilding one never reads it.
        freeze: keep the encoder's weights fixed (``requires_grad`` False) while the rest trains.
    """

    leads: int = 12
    samples: int = 300
    patch: int = 75
    dim: int = 64
    depth: int = 2
    heads: int = 4
    checkpoint: str | None = None
    freeze: bool = False


@dataclass(frozen=True)
class GeneratorConfig:
    """MaskGIT generator over video tokens with cross-attention to ECG tokens.

    Attributes:
        ecg_frame_embedding: also add, to every token of token frame ``j``, an embedding of the
            raw ECG window around that frame's time (the ECG starts at the clip's first frame,
            ``ECG_FS`` Hz). Cross-attention alone has to learn which ECG patch belongs to which
            frame; this gives the alignment directly (see docs/architecture.md).
        fps: the clip's frame rate (``ClipConfig.fps``): where each token frame lies on the ECG.
        temporal_patch: the tokenizer's temporal patch (``TokenizerConfig.temporal_patch``): token
            frame ``j >= 1`` holds frames ``p(j - 1) + 1 .. pj``, which places it on the ECG.
        prime_prob: fraction of training samples whose leading token frames are left unmasked:
            half of them the first token frame alone (generation primed with a first frame), half
            :attr:`chain_prime_token_frames` of them (what each chained window of a long video is
            primed with).
        lead_dropout: fraction of training samples whose ECG loses leads: half of those keep a
            single lead (I or II, the leads a watch or a monitor records), the others a random
            subset. The lead mask is a model input (:meth:`MaskGIT.encode_ecg`), so a single-lead
            ECG is a condition the model was trained on, not eleven unexplained zero leads.
        lead_mask_input: feed the lead mask to the model (a learned "lead missing" token in place
            of each absent lead's ECG tokens, and the mask beside the raw ECG in the frame
            embedding).
    """

    vocab_size: int = 125
    token_grid: tuple[int, int, int] = (3, 4, 4)
    dim: int = 64
    depth: int = 2
    heads: int = 4
    ecg: ECGEncoderConfig = field(default_factory=ECGEncoderConfig)
    cond_dropout: float = 0.15
    schedule: str = "cosine"
    mask_ratio_min: float = 0.0  # training mask ratio = min + (max - min) * schedule(r)
    mask_ratio_max: float = 1.0
    num_views: int = 0  # > 0: the generator is also conditioned on an echo-view id (A4C, ...)
    ef_conditioning: bool = False  # also conditioned on the ejection fraction, in [0, 1]
    ecg_frame_embedding: bool = True
    fps: float = 5.0
    temporal_patch: int = 2
    prime_prob: float = 0.3
    lead_dropout: float = 0.3
    lead_mask_input: bool = True

    @property
    def chain_prime_token_frames(self) -> int:
        """Token frames each chained window of a long video is primed with: a third of the window."""
        return max(1, self.token_grid[0] // 3)

    @property
    def seq_len(self) -> int:
        t, h, w = self.token_grid
        return t * h * w

    @property
    def ecg_samples_per_frame(self) -> int:
        """ECG samples between two video frames (``ECG_FS / fps``, rounded)."""
        return max(1, round(ECG_FS / self.fps))


@dataclass(frozen=True)
class TrainConfig:
    """One training run (tokenizer or generator)."""

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: only the final one)
    keep_checkpoints: int = 2  # best checkpoints (by validation score) kept, plus the latest
    max_failures: int = 1  # worker-group restarts from the latest checkpoint
    workers: int = 1
    seed: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is the global batch)
    ema_decay: float = 0.999  # EMA of the weights (warmed up); 0 disables
    val_every: int = 0  # steps between validations (0: at every logged step); always at checkpoints
    sample_every: int = 0  # steps between sample GIFs logged to MLflow (0: only at the end)
    bf16: bool = True  # bf16 autocast on GPU (never on CPU)
    augment: bool = False  # tokenizer only: mirror/reverse/zoom/turn/shift/blur/gain each clip (transforms.augment)

    def __post_init__(self) -> None:
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class SamplingConfig:
    """Iterative parallel decoding settings (see :func:`echopulse.models.sampling.sample`).

    ``order``: "confidence" (MaskGIT re-masking) or "halton" (a fixed spread-out order; each step
    projects only the tokens it decodes). ``precision`` "bf16" and ``compile`` (a
    ``torch.compile`` mode, e.g. "reduce-overhead"; "" is off) are the GPU path's options.
    ``negative``: what guidance pushes away from: "null" (the learned null condition, classic
    classifier-free guidance) or "shifted" (the same ECG half a beat later,
    :func:`echopulse.transforms.ecg.shifted_ecg`: only what depends on the beat's timing is
    amplified). ``window_candidates``: a chained window of a long video is drawn up to this many
    times until its mean frame has SSIM >= ``window_accept_ssim`` to the first window's (else the
    closest draw is kept): the view and look stay the first window's.

    ``guidance_candidates``: the weights tried on the validation split when generator training
    ends (:mod:`echopulse.calibration`); the one that makes the generated motion follow the real
    clips' measurably better than g=0 becomes this checkpoint's ``guidance`` (0 when none does).
    Empty: no calibration, ``guidance`` is kept. ``calibration_clips`` validation clips are drawn
    with ``calibration_seeds`` seeds per weight.
    """

    steps: int = 8
    guidance: float = 2.0
    temperature: float = 1.0
    schedule: str = "cosine"
    order: str = "confidence"
    precision: str = "fp32"
    compile: str = ""
    negative: str = "null"
    window_candidates: int = 3
    window_accept_ssim: float = 0.85
    guidance_candidates: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    calibration_clips: int = 32
    calibration_seeds: int = 2

    def __post_init__(self) -> None:
        if self.guidance_candidates and (self.calibration_clips < 2 or self.calibration_seeds < 1):
            raise ValueError("guidance calibration needs calibration_clips >= 2 and calibration_seeds >= 1, got "
                             f"{self.calibration_clips} and {self.calibration_seeds}")
        if self.steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {self.steps}")
        if self.order not in ("confidence", "halton"):
            raise ValueError(f"sampling order must be 'confidence' or 'halton', got {self.order!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"sampling precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.window_candidates < 1:
            raise ValueError(f"window_candidates must be >= 1, got {self.window_candidates}")
        if self.negative not in ("null", "shifted"):
            raise ValueError(f"sampling negative must be 'null' or 'shifted', got {self.negative!r}")

    def options(self) -> dict:
        """The keyword options of ``sample``/``MaskGIT.generate`` this config sets."""
        return {"steps": self.steps, "guidance": self.guidance, "temperature": self.temperature,
                "schedule": self.schedule, "order": self.order, "precision": self.precision,
                "compile_mode": self.compile or None}


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep over masking schedules.

    Training axes (each trial trains one model): ``schedules``, ``mask_ratio_bounds``,
    ``lr_factors`` (times the recipe's generator lr). Sampling axes (each trial's model is evaluated
    at every ``sampling_steps`` value, with its own draw of ``sampling_schedules``, ``guidance``,
    ``temperature``, ``sampling_orders``). ``search`` "grid" takes the first ``trials`` points of the
    grid; "random" draws ``trials`` points with ``seed``. The best recipe samples with the fewest
    ``sampling_steps`` whose validation SSIM and ECG-control score are within ``steps_tolerance``
    of the most steps' (the best trial's).
    """

    trials: int = 2
    search: str = "grid"
    schedules: tuple[str, ...] = ("cosine", "linear", "square", "sqrt")
    mask_ratio_bounds: tuple[tuple[float, float], ...] = ((0.0, 1.0),)
    lr_factors: tuple[float, ...] = (1.0, 0.5, 2.0)
    sampling_steps: tuple[int, ...] = (4, 8, 12)
    sampling_schedules: tuple[str, ...] = ("cosine",)
    guidance: tuple[float, ...] = (2.0,)
    temperature: tuple[float, ...] = (1.0,)
    sampling_orders: tuple[str, ...] = ("confidence",)
    steps_tolerance: float = 0.02
    steps: int = 30
    max_concurrent: int = 1
    asha: bool = True
    eval_clips: int = 4
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """Everything one end-to-end run needs; named recipes are functions in ``jobs/recipes.py``."""

    name: str
    clip: ClipConfig
    tokenizer: TokenizerConfig
    generator: GeneratorConfig
    tokenizer_train: TrainConfig
    generator_train: TrainConfig
    sampling: SamplingConfig
    tune: TuneConfig = field(default_factory=TuneConfig)
    synth_studies: int = 6
    synth_seconds: float = 4.0

    def __post_init__(self) -> None:
        gen = self.generator
        if gen.ecg_frame_embedding and abs(gen.fps - self.clip.fps) > 1e-6:
            raise ValueError(f"generator.fps {gen.fps} differs from clip.fps {self.clip.fps}: the "
                             f"ECG frame embedding would look at the wrong part of the ECG")
        if gen.ecg_frame_embedding and gen.temporal_patch != self.tokenizer.temporal_patch:
            raise ValueError(f"generator.temporal_patch {gen.temporal_patch} differs from the "
                             f"tokenizer's {self.tokenizer.temporal_patch}: the ECG frame embedding "
                             f"would place token frames at the wrong times")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a (possibly nested) frozen config dataclass from :func:`to_dict` output.

    Raises:
        ValueError: when ``data`` has keys the dataclass does not know.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name, value in data.items():
        sub = _dataclass_for(hints[name])
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = _tuples(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


_CONFIG_CLASSES = {
    c.__name__: c
    for c in (ClipConfig, TokenizerConfig, ECGEncoderConfig, GeneratorConfig, TrainConfig,
              SamplingConfig, TuneConfig, Recipe)
}


def _dataclass_for(type_hint: Any) -> type | None:
    # with `from __future__ import annotations` field types are strings
    name = type_hint if isinstance(type_hint, str) else getattr(type_hint, "__name__", "")
    return _CONFIG_CLASSES.get(name)


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` re-exported so callers need one import."""
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
