"""The data sources' configs, apart from their generators: dataclasses with their defaults
and checks, importable without numpy (the command line builds its options from them,
``xmr.data.sources.options``; each source module re-exports its own)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from xmr.data.tvr_annotations import QUERY_TYPES


TVR_SIZES = {"train": 17435, "val": 2179}


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class MelParams:
    """Feature parameters; ``n_frames`` fixes the output length (pad/crop) so shapes are static."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400      # 25 ms
    hop_length: int = 480      # 30 ms: 32 frames cover ~1 s, a spoken digit
    n_mels: int = 40
    f_min: float = 50.0
    f_max: float = 8000.0
    n_frames: int = 32
    log_floor: float = 1e-6    # added to mel power before log; sets the silence level

    def validate(self) -> None:
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length {self.win_length} must be <= n_fft {self.n_fft}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={self.f_min} "
                             f"f_max={self.f_max} sample_rate={self.sample_rate}")
        for name in ("n_fft", "win_length", "hop_length", "n_mels", "n_frames", "sample_rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def window_samples(self) -> int:
        """Waveform length whose STFT (no centring) has exactly ``n_frames`` frames."""
        return (self.n_frames - 1) * self.hop_length + self.n_fft

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SynthCategoryConfig:
    """Sizes and difficulty knobs; defaults are small enough for CI."""

    n_classes: int = 10
    splits: dict[str, int] = field(default_factory=lambda: {"train": 400, "val": 100, "test": 100})
    dim_a: int = 32
    dim_b: int = 48
    seq_len_a: int | None = None       # None: shape [dim]; int T: shape [T, dim]
    seq_len_b: int | None = None
    latent_dim: int = 16
    class_scale: float = 0.6           # spread of class means (nearest-mean accuracy ~0.7 on a)
    instance_scale: float = 0.7        # per-pair component shared by a and b (linear-map R@1 ~0.45)
    noise_a: float = 0.8
    noise_b: float = 0.8
    token_noise: float = 0.3           # per-token latent noise for sequence modalities
    offset_scale: float = 1.0          # modality offset (part of the modality gap)
    hierarchy: int | None = None       # number of coarse classes; labels become label_path
    fine_scale: float = 0.3            # spread of fine means around their coarse mean
    multi_label: bool = False
    max_labels: int = 3
    seed: int = 0
    dtype: str = "float16"

    def validate(self) -> None:
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if not self.splits or any(n < 1 for n in self.splits.values()):
            raise ValueError(f"splits must map names to sizes >= 1, got {self.splits}")
        for name in ("dim_a", "dim_b", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len_a", "seq_len_b"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be None or >= 1, got {v}")
        if self.hierarchy is not None:
            if not 2 <= self.hierarchy < self.n_classes or self.n_classes % self.hierarchy:
                raise ValueError(f"hierarchy (coarse classes) must divide n_classes={self.n_classes} and be in "
                                 f"[2, n_classes), got {self.hierarchy}")
            if self.multi_label:
                raise ValueError("hierarchy and multi_label cannot be combined (label_path vs label_set)")
        if self.multi_label and not 1 <= self.max_labels <= self.n_classes:
            raise ValueError(f"max_labels must be in [1, n_classes], got {self.max_labels}")


@dataclass
class SynthVcmrConfig:
    """Corpus sizes and difficulty knobs; defaults are small enough for CI."""

    splits: dict[str, int] = field(default_factory=lambda: {"train": 60, "val": 20, "test": 20})
    dim_visual: int = 32
    dim_subtitle: int = 24
    dim_query: int = 24
    latent_dim: int = 16
    clip_len: float = 1.5
    min_duration: float = 12.0
    max_duration: float = 90.0
    min_queries: int = 1
    max_queries: int = 4
    min_moment: float = 1.5            # seconds
    max_moment: float = 15.0
    edge_prob: float = 0.2             # share of moments snapped to the video start or end
    type_probs: dict[str, float] = field(default_factory=lambda: {"v": 1 / 3, "t": 1 / 3, "vt": 1 / 3})
    single_stream_share: float | None = None  # set: P(v) = P(t) = share / 2, P(vt) = 1 - share (overrides type_probs)
    sub_missing: float = 0.3           # share of clips without a subtitle
    signal: float = 2.0
    content_scale: float = 1.0
    noise: float = 0.3
    min_tokens: int = 4
    max_tokens: int = 12
    token_noise: float = 0.5
    query_offset_scale: float = 1.0    # how far apart the two query vocabularies' means lie
    # How plainly a single-stream (v / t) query's words say its type: each of its tokens is
    # written in its own stream's vocabulary with probability (1 + type_cue) / 2, else in the
    # other's. 1: always its own (the type is perfectly predictable from the words); 0: either
    # vocabulary alike (as mixed as a vt query's). Real TVR queries sit in between: see
    # bench/qcf_cue.py, which picks the level a held-out classifier finds as weak as on TVR.
    type_cue: float = 1.0
    distractors_per_video: int = 1
    cross_stream_distractors: float = 0.5  # P(a query's latent also sits in the other stream of another video)
    durations_from: str | None = None  # TVR jsonl: sample real (duration, ts, type) per video
    seed: int = 0
    dtype: str = "float16"

    def validate(self) -> None:
        if not self.splits or any(n < 1 for n in self.splits.values()):
            raise ValueError(f"splits must map names to video counts >= 1, got {self.splits}")
        if not 0 < self.clip_len:
            raise ValueError(f"clip_len must be > 0, got {self.clip_len}")
        if not 0 < self.min_duration <= self.max_duration:
            raise ValueError(f"need 0 < min_duration <= max_duration, got {self.min_duration}, {self.max_duration}")
        if not 1 <= self.min_queries <= self.max_queries:
            raise ValueError(f"need 1 <= min_queries <= max_queries, got {self.min_queries}, {self.max_queries}")
        if not 0 < self.min_moment <= self.max_moment:
            raise ValueError(f"need 0 < min_moment <= max_moment, got {self.min_moment}, {self.max_moment}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
        if set(self.type_probs) - set(QUERY_TYPES) or sum(self.type_probs.values()) <= 0 \
                or any(p < 0 for p in self.type_probs.values()):
            raise ValueError(f"type_probs must be non-negative weights over {QUERY_TYPES}, got {self.type_probs}")
        if not 0 <= self.sub_missing < 1:
            raise ValueError(f"sub_missing must be in [0, 1), got {self.sub_missing}")
        if self.single_stream_share is not None and not 0 <= self.single_stream_share <= 1:
            raise ValueError(f"single_stream_share must be in [0, 1], got {self.single_stream_share}")
        if not 0 <= self.cross_stream_distractors <= 1:
            raise ValueError(f"cross_stream_distractors must be in [0, 1], got {self.cross_stream_distractors}")
        if not 0 <= self.type_cue <= 1:
            raise ValueError(f"type_cue must be in [0, 1], got {self.type_cue}")
        if self.durations_from is not None and not Path(self.durations_from).is_file():
            raise FileNotFoundError(f"durations_from: no such TVR jsonl file {self.durations_from!r}")


@dataclass
class TextVcmrConfig:
    """Which annotations, how many videos per split, and the planting knobs."""

    queries_from: str = ""
    text_encoder: str = "minilm"
    splits: dict[str, int] = field(default_factory=lambda: {"train": 60, "val": 20, "test": 20})
    dim_visual: int = 32  # as synth vcmr's (the command line always gave these)
    dim_subtitle: int = 24
    clip_len: float = 1.5
    max_queries: int = 0  # per video; 0: all of the video's annotated queries
    signal: float = 2.0
    content_scale: float = 1.0
    noise: float = 0.3
    sub_missing: float = 0.3
    seed: int = 0
    dtype: str = "float16"

    def validate(self) -> None:
        if not self.queries_from or not Path(self.queries_from).is_file():
            raise FileNotFoundError(f"queries_from: no such annotations file {self.queries_from!r}")
        if not self.splits or any(n < 1 for n in self.splits.values()):
            raise ValueError(f"splits must map names to video counts >= 1, got {self.splits}")
        if self.clip_len <= 0 or self.signal < 0 or self.noise < 0:
            raise ValueError("clip_len must be > 0 and signal, noise >= 0")
        if not 0 <= self.sub_missing < 1:
            raise ValueError(f"sub_missing must be in [0, 1), got {self.sub_missing}")
        if self.max_queries < 0:
            raise ValueError(f"max_queries must be >= 0 (0: all), got {self.max_queries}")


@dataclass
class TvrReleaseConfig:
    """Sizes, dimensions and the planted structure's knobs (those of ``SynthVcmrConfig``)."""

    splits: dict[str, int] = field(default_factory=lambda: dict(TVR_SIZES))
    annotations: str | None = None  # real validation jsonl: val queries taken, train queries drawn from it
    video2dur: str | None = None  # real tvr_video2dur_idx.json: each split's video names and durations
    dim_visual: int = 3072
    dim_subtitle: int = 768
    dim_query: int = 768
    max_tokens: int = 30
    min_tokens: int = 4
    synth: SynthVcmrConfig = field(default_factory=lambda: SynthVcmrConfig(min_duration=20.0, max_duration=150.0,
                                                                           min_queries=3, max_queries=7,
                                                                           max_moment=30.0))
    seed: int = 0

    def validate(self) -> None:
        if not self.splits or any(n < 1 for n in self.splits.values()):
            raise ValueError(f"splits must map names to video counts >= 1, got {self.splits}")
        for name in ("annotations", "video2dur"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name}: no such file {path!r}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")

    def generator(self) -> SynthVcmrConfig:
        return replace(self.synth, dim_visual=self.dim_visual, dim_subtitle=self.dim_subtitle,
                       dim_query=self.dim_query, min_tokens=self.min_tokens, max_tokens=self.max_tokens,
                       clip_len=1.5, seed=self.seed, durations_from=None)


@dataclass
class AvdigitsConfig:
    """Sizes, synthesis variation and feature parameters (defaults build the committed set)."""

    per_class: int | None = 90         # images per digit (None: all 1,797); 90 keeps it under ~5 MB
    limit: int | None = None           # total cap after per_class, stratified (quick test builds)
    voices: tuple[str, ...] = ("en-us", "en-gb", "en-us+f2", "en-us+f4", "en-gb+m3", "en-us+klatt2",
                               "en-gb-scotland+m7", "en-029+croak")
    speeds: tuple[int, ...] = (120, 150, 180, 210)        # words per minute
    pitches: tuple[int, ...] = (25, 45, 65, 85)           # espeak-ng 0..99
    snr_db: tuple[float, float] = (5.0, 25.0)             # white noise, uniform in this range
    gain: tuple[float, float] = (0.3, 0.9)                # peak amplitude before noise
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    mel: MelParams = field(default_factory=MelParams)
    seed: int = 0
    dtype: str = "float16"

    def validate(self) -> None:
        if self.per_class is not None and self.per_class < 3:
            raise ValueError(f"per_class must be >= 3 (one per split) or None, got {self.per_class}")
        if self.limit is not None and self.limit < 3 * len(DIGIT_WORDS):
            raise ValueError(f"limit must be >= {3 * len(DIGIT_WORDS)} (every digit in every split), got {self.limit}")
        if not self.voices or not self.speeds or not self.pitches:
            raise ValueError("voices, speeds and pitches must each list at least one value")
        if abs(sum(self.fractions.values()) - 1) > 1e-6 or any(f <= 0 for f in self.fractions.values()):
            raise ValueError(f"fractions must be positive and sum to 1, got {self.fractions}")
        self.mel.validate()


DIGITS_VIEWS = ("left_right", "top_bottom")


@dataclass
class DigitsViewsConfig:
    """scikit-learn's digits as two views of one image (a same-modality proxy for paired
    retrieval: both views are pixels). Sizes are per class and per split; the split is
    seeded and stratified. ``train_per_class`` is the knob that keeps the task off its
    ceiling (chosen on validation: see the specs that use it)."""

    views: str = "left_right"          # left_right: a = columns 0-3, b = 4-7; top_bottom: a = rows 0-3, b = 4-7
    train_per_class: int | None = None  # None: every image left after val and test (at least 94 per digit)
    val_per_class: int = 30
    test_per_class: int = 50
    seed: int = 0
    dtype: str = "float16"

    def validate(self) -> None:
        if self.views not in DIGITS_VIEWS:
            raise ValueError(f"views must be one of {DIGITS_VIEWS}, got {self.views!r}")
        for name in ("val_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ValueError(f"train_per_class must be >= 1 or None (all), got {self.train_per_class}")
        # the rarest digit in load_digits has 174 images
        need = (self.train_per_class or 0) + self.val_per_class + self.test_per_class
        if need > 174:
            raise ValueError(f"train_per_class + val_per_class + test_per_class = {need}: the rarest digit has 174 "
                             f"images")
