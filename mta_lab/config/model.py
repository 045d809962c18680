"""Model configuration: one small dataclass per Multi-Token Attention mechanism.

A mechanism set to ``None`` is off. Each dataclass checks itself in ``__post_init__``; rules that need
the model's shape (head groups, layer indices) are checked by :class:`ModelConfig`. Errors are
:class:`ConfigFieldError` (a ``ValueError``) naming the field, the bad value and what is allowed.

"spec x.y" refers to the MTA specification (docs/mta-spec.md of the project notes); "Eq. n" to the
paper, arXiv 2504.00927v2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum


class ConfigFieldError(ValueError):
    """A config value is invalid. ``field`` is its dotted name relative to the dataclass that raised."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigFieldError(field, message)


def _choices(enum: type[Enum]) -> str:
    return "|".join(member.value for member in enum)


class KeyPadding(str, Enum):
    """Where the key axis of a key-query convolution is zero-padded (spec 1.2)."""

    both = "both"
    """Keys j-(c_k-1)/2 .. j+(c_k-1)/2 around key j; needs an odd key kernel."""
    left = "left"
    """Keys j-c_k+1 .. j."""
    right = "right"
    """Keys j .. j+c_k-1."""


class KernelInit(str, Enum):
    """Initialisation of a key-query kernel (spec 1.7)."""

    identity = "identity"
    """1 at (current query, same key), 0 elsewhere: the layer starts as plain attention."""
    zero = "zero"
    """All zeros (the paper's ablation; not in the official code)."""
    const = "const"
    """Every tap equals ``init_scale`` (default 0.3)."""
    uniform = "uniform"
    """U(-a, a) with a = ``init_scale`` (default 1)."""
    normal = "normal"
    """N(0, s) truncated at +-3s, s = ``init_scale`` (default 0.3); the official code's intent."""
    diagonal = "diagonal"
    """Ones on the diagonal through the identity tap: sums A[i-k, j-k] over k ("sequence matcher").

    With ``both`` key padding this is the official diagonal, b - a = (c_k+1)//2 - c_q (spec 1.7). With
    one-sided (``left``/``right``) padding we depart from the official code on purpose. The official code
    keeps that same diagonal whatever the padding, so it would no longer pass through (current query,
    same key). It would then match a sequence shifted by the padding rather than the one ending at the
    current cell. Here the diagonal follows the padding and always passes through that tap."""


class DepthScaling(str, Enum):
    """A per-layer factor applied after a norm, from the layer's 0-based index l (spec 1.5)."""

    none = "none"
    """Factor 1."""
    diff = "diff"
    """1 - (0.8 - 0.6 exp(-0.3 l)), DIFF Transformer's lambda_init; the official code's choice."""
    inverse_sqrt = "inverse_sqrt"
    """1 / sqrt(l + 1), the "curse of depth" LayerNorm scaling the paper names."""


class GateKind(str, Enum):
    """Gate on each head's normalised output: out * sigmoid(Linear(out)) (spec 1.5)."""

    none = "none"
    """No gate."""
    scalar = "scalar"
    """Linear(head_dim, 1): one gate per token and head (the paper's "scalar gating")."""
    elementwise = "elementwise"
    """Linear(head_dim, head_dim): one gate per channel."""


class InitStdFactor(str, Enum):
    """Divisor of the output projections' init std per layer (Lingua's ``init_std_factor``)."""

    disabled = "disabled"
    """1."""
    global_depth = "global_depth"
    """sqrt(2 (n_layers + 1))."""
    current_depth = "current_depth"
    """sqrt(2 (layer + 1))."""
    dim_ratio = "dim_ratio"
    """dim / 4096."""


@dataclass
class LayerSelection:
    """The layers (0-based) a mechanism runs in: every ``every``-th from ``offset``, or ``indices``."""

    every: int = 1
    """Run in every k-th layer. The paper's main model uses 4 for its key-query convolutions."""
    offset: int = 0
    """First layer (0-based) of the every-k pattern. Paper: 2, giving layers 2, 6, 10, ..."""
    indices: list[int] | None = None
    """Explicit 0-based layer indices. They take precedence: ``every`` and ``offset`` are reset to
    1 and 0, so an override ``...layers.indices=[0,3]`` replaces a preset's every/offset pattern."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, "every", f"{self.every} is not allowed; use an integer >= 1")
        _check(self.offset >= 0, "offset", f"{self.offset} is not allowed; use an integer >= 0")
        if self.indices is not None:
            self.every, self.offset = 1, 0
            _check(
                len(set(self.indices)) == len(self.indices) and all(i >= 0 for i in self.indices),
                "indices",
                f"{list(self.indices)} must be distinct integers >= 0",
            )

    def layer_ids(self, n_layers: int) -> list[int]:
        """The selected layer indices of an ``n_layers``-layer model, ascending."""
        if self.indices is not None:
            return sorted(self.indices)
        return list(range(self.offset, n_layers, self.every))

    def describe(self) -> str:
        if self.indices is not None:
            return f"layers {sorted(self.indices)}"
        if self.every == 1 and self.offset == 0:
            return "all layers"
        return f"every {self.every} from {self.offset}"


@dataclass
class QKConvConfig:
    """Key-query convolution: a depthwise 2-D convolution over each head's (query, key) map.

    Before softmax (Eq. 5): A = Softmax(Mask_-inf(Conv(Mask_0(QK^T / sqrt(d))))).
    After softmax (Eq. 6): A = Mask_0(Conv(Softmax(Mask_-inf(QK^T / sqrt(d))))), not renormalised.
    The kernel is stored as in the official code (spec 1.2): its last row is the current query, and
    with ``both`` padding its centre column is the same key.
    """

    query_kernel: int = 6
    """c_q: the current query and the c_q-1 queries before it (query padding is causal)."""
    key_kernel: int = 11
    """c_k: keys mixed around each key; odd when key_padding is ``both``."""
    key_padding: KeyPadding = KeyPadding.both
    """Placement of the c_k keys relative to key j: ``both``, ``left`` or ``right``."""
    init: KernelInit = KernelInit.identity
    """Kernel initialisation; ``identity`` needs ``both`` padding, as in the official code."""
    init_scale: float | None = None
    """Scale of ``const``/``uniform``/``normal`` inits (defaults 0.3 / 1.0 / 0.3); unset for others."""
    layers: LayerSelection = field(default_factory=LayerSelection)
    """Layers with this convolution."""

    def __post_init__(self) -> None:
        _check(self.query_kernel >= 1, "query_kernel", f"{self.query_kernel} is not allowed; use >= 1")
        _check(self.key_kernel >= 1, "key_kernel", f"{self.key_kernel} is not allowed; use >= 1")
        _check(
            self.key_padding != KeyPadding.both or self.key_kernel % 2 == 1,
            "key_kernel",
            f"{self.key_kernel} is even, but key_padding=both needs an odd key_kernel "
            f"(allowed: odd values, or key_padding=left|right)",
        )
        _check(
            self.init != KernelInit.identity or self.key_padding == KeyPadding.both,
            "init",
            f"identity needs key_padding=both, got key_padding={self.key_padding.value} "
            f"(allowed with one-sided padding: {_choices(KernelInit).replace('identity|', '')})",
        )
        scaled = (KernelInit.const, KernelInit.uniform, KernelInit.normal)
        _check(
            self.init_scale is None or self.init in scaled,
            "init_scale",
            f"is used only by init=const|uniform|normal, not init={self.init.value}; leave it unset",
        )
        _check(
            self.init_scale is None or self.init == KernelInit.const or self.init_scale > 0,
            "init_scale",
            f"{self.init_scale} must be > 0 for init={self.init.value}",
        )

    @property
    def left_pad(self) -> int:
        """Zero columns added before key 0: the kernel column that lines up with key j."""
        return {
            KeyPadding.both: (self.key_kernel - 1) // 2,
            KeyPadding.left: self.key_kernel - 1,
            KeyPadding.right: 0,
        }[self.key_padding]

    def describe(self) -> str:
        text = f"{self.query_kernel}x{self.key_kernel}"
        if self.key_padding != KeyPadding.both:
            text += f" {self.key_padding.value}-pad"
        return text if self.init == KernelInit.identity else f"{text} {self.init.value}"


@dataclass
class HeadMixConfig:
    """Head mixing: each attention map becomes a learned combination of the maps of the heads in its
    group (Eq. 7). Groups are c_h contiguous heads; c_h = n_heads is full mixing (talking heads).
    Weights start as the identity. Before softmax it mixes logits, after softmax probabilities.
    """

    group_size: int | None = None
    """c_h: heads per group, dividing n_heads; null means all heads in one group."""
    layers: LayerSelection = field(default_factory=LayerSelection)
    """Layers with this head mixing."""

    def __post_init__(self) -> None:
        _check(
            self.group_size is None or self.group_size >= 1,
            "group_size",
            f"{self.group_size} is not allowed; use a divisor of n_heads, or null for all heads",
        )

    def size(self, n_heads: int) -> int:
        return n_heads if self.group_size is None else self.group_size

    def describe(self) -> str:
        return "all heads" if self.group_size is None else f"c_h={self.group_size}"


@dataclass
class OutNormConfig:
    """Per-head output normalisation and gate, applied to each head's attention output before the
    output projection, in every selected layer whether or not it runs a convolution (spec 1.5).
    Order: RMSNorm over head_dim (weight shared across heads) -> depth scaling -> gate.
    """

    norm: bool = True
    """RMSNorm of each head's output; false keeps only the gate (official: add_gating alone)."""
    eps: float = 1e-5
    """RMSNorm epsilon."""
    depth_scaling: DepthScaling = DepthScaling.none
    """Factor after the norm: ``none``, ``diff`` (paper's "depth scaling") or ``inverse_sqrt``."""
    gate: GateKind = GateKind.none
    """Sigmoid gate from the normalised output: ``none``, ``scalar`` (paper) or ``elementwise``."""
    layers: LayerSelection = field(default_factory=LayerSelection)
    """Layers with this norm and gate."""

    def __post_init__(self) -> None:
        _check(self.eps > 0, "eps", f"{self.eps} must be > 0")
        _check(
            self.norm or self.depth_scaling == DepthScaling.none,
            "depth_scaling",
            f"{self.depth_scaling.value} scales the norm's output and needs norm=true",
        )
        _check(
            self.norm or self.gate != GateKind.none,
            "norm",
            "norm=false with gate=none does nothing; set out_norm to null instead",
        )

    def describe(self) -> str:
        parts = ["norm"] if self.norm else []
        if self.depth_scaling != DepthScaling.none:
            parts.append(self.depth_scaling.value)
        if self.gate != GateKind.none:
            parts.append(f"{self.gate.value} gate")
        return "+".join(parts)


@dataclass
class MTAConfig:
    """Multi-Token Attention, in the order of its pipeline (spec 1.1). ``None`` switches a stage off;
    a layer where no stage runs is plain causal attention (scaled_dot_product_attention).
    """

    pre_qk_conv: QKConvConfig | None = None
    """Key-query convolution on the logits, before softmax."""
    pre_head_mix: HeadMixConfig | None = None
    """Head mixing of the logits, before softmax (grouped, unlike the official code)."""
    post_qk_conv: QKConvConfig | None = None
    """Key-query convolution on the attention weights, after softmax."""
    post_head_mix: HeadMixConfig | None = None
    """Head mixing of the attention weights, after softmax."""
    out_norm: OutNormConfig | None = None
    """Per-head RMSNorm, depth scaling and gate of the attention output."""

    def mechanisms(self) -> dict[str, QKConvConfig | HeadMixConfig | OutNormConfig]:
        """The stages that are on, by field name, in pipeline order."""
        stages = {name: getattr(self, name) for name in MTA_STAGES}
        return {name: cfg for name, cfg in stages.items() if cfg is not None}

    @property
    def needs_score_map(self) -> bool:
        """Whether a stage works on the (query, key) map, which plain SDPA never exposes."""
        return any(name in SCORE_MAP_STAGES for name in self.mechanisms())


MTA_STAGES = tuple(stage.name for stage in dataclasses.fields(MTAConfig))
"""The MTA stages in pipeline order: the fields of :class:`MTAConfig`, the one place that lists them."""
SCORE_MAP_STAGES = tuple(name for name in MTA_STAGES if name != "out_norm")
"""The stages that act on the (query, key) map, which plain SDPA never exposes."""


MAX_LAYERS = 1024
"""More layers than any published model; what ``n_layers`` may be."""


@dataclass
class ModelConfig:
    """A decoder-only Llama-style LM (as in the paper, App. D): token embedding, pre-RMSNorm blocks,
    RoPE, SwiGLU FFN, optional tied embeddings, grouped-query attention, and Multi-Token Attention.
    """

    vocab_size: int = 260
    """Vocabulary size; 260 fits the byte-level tokenizer (256 bytes and 4 special tokens)."""
    dim: int = 512
    """Model width D."""
    n_layers: int = 8
    """Number of transformer blocks."""
    n_heads: int = 8
    """Query heads M; head_dim = dim / n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention, dividing n_heads; null means n_heads."""
    ffn_mult: float = 1.0
    """SwiGLU hidden = round_up(multiple_of, int(ffn_mult * int(2 * 4 * dim / 3)))."""
    multiple_of: int = 256
    """Rounding of the SwiGLU hidden size."""
    ffn_hidden_size: int | None = None
    """The SwiGLU hidden size itself, instead of ffn_mult and multiple_of (an imported model's
    ``intermediate_size``); null: from those."""
    norm_eps: float = 1e-5
    """Epsilon of the block and final RMSNorms."""
    rope_theta: float = 10_000.0
    """RoPE base; the paper uses 100000 (500000 for long-context finetuning)."""
    max_seq_len: int = 2048
    """Longest sequence the model accepts."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection (every paper model does)."""
    dropout: float = 0.0
    """Dropout on the attention weights during training (as in the official code)."""
    init_std: float | None = None
    """Std of the truncated-normal init of embeddings and projections; null means dim ** -0.5."""
    init_std_factor: InitStdFactor = InitStdFactor.disabled
    """Divisor of the output-projection init std by depth (Lingua)."""
    prenorm_scaling: DepthScaling = DepthScaling.none
    """Factor after each block's pre-norms (official ``curse_norm`` is ``diff``)."""
    mta: MTAConfig | None = None
    """Multi-Token Attention; null is the plain-attention baseline."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "multiple_of",
            "max_seq_len",
        ):
            value = getattr(self, name)
            _check(value >= 1, name, f"{value} is not allowed; use an integer >= 1")
        _check(self.ffn_mult > 0, "ffn_mult", f"{self.ffn_mult} must be > 0")
        _check(
            self.ffn_hidden_size is None or self.ffn_hidden_size >= 1,
            "ffn_hidden_size",
            f"{self.ffn_hidden_size} is not allowed; use an integer >= 1 (or null)",
        )
        # Every layer is a module built in Python, even on the meta device: a million would hang `info`.
        _check(
            self.n_layers <= MAX_LAYERS,
            "n_layers",
            f"{self.n_layers} is more than {MAX_LAYERS} (allowed: 1..{MAX_LAYERS})",
        )
        _check(
            self.dim % self.n_heads == 0,
            "n_heads",
            f"{self.n_heads} does not divide dim={self.dim} (allowed: divisors of dim)",
        )
        _check(
            self.head_dim % 2 == 0,
            "n_heads",
            f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE",
        )
        _check(
            self.n_kv_heads is None or (self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0),
            "n_kv_heads",
            f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads} "
            f"(allowed: {_divisors(self.n_heads)})",
        )
        _check(0.0 <= self.dropout < 1.0, "dropout", f"{self.dropout} must be in [0, 1)")
        _check(self.init_std is None or self.init_std > 0, "init_std", f"{self.init_std} must be > 0")
        if self.mta is not None:
            self._check_mta(self.mta)

    def _check_mta(self, mta: MTAConfig) -> None:
        for name, mechanism in mta.mechanisms().items():
            if isinstance(mechanism, HeadMixConfig):
                size = mechanism.size(self.n_heads)
                _check(
                    self.n_heads % size == 0,
                    f"mta.{name}.group_size",
                    f"{size} does not divide n_heads={self.n_heads} "
                    f"(allowed: {_divisors(self.n_heads)}, or null for all heads)",
                )
            selection = mechanism.layers
            ids = selection.layer_ids(self.n_layers)
            out_of_range = [i for i in ids if i >= self.n_layers]
            _check(
                not out_of_range,
                f"mta.{name}.layers.indices",
                f"{out_of_range} out of range for n_layers={self.n_layers} (allowed: 0..{self.n_layers - 1})",
            )
            _check(
                bool(ids),
                f"mta.{name}.layers",
                f"'{selection.describe()}' selects none of the {self.n_layers} layers "
                f"(allowed: indices or offsets in 0..{self.n_layers - 1}); set {name} to null to switch it off",
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        hidden = int(self.ffn_mult * int(2 * 4 * self.dim / 3))
        return self.multiple_of * -(-hidden // self.multiple_of)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
