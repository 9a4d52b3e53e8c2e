"""Architecture of a class-conditional BitDance model (``imagenet_gen/``, spec §7) and the official presets.

``ClassModelConfig`` holds everything needed to build the modules: the AR transformer (dim, layers, heads), the
class prefix (``cls_token_num`` tokens per class, ``num_classes`` + 1 rows with the null class last), the head
(``MlpEncoder`` when ``parallel_num`` is 1, else ``TransEncoder``), the token grid and order, and the
autoencoder's ``ddconfig``. ``resolve.py`` decides where each field comes from.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

# The official presets (``BitDance_{B,L,H}`` in imagenet_gen/src/model*.py): dim / layers / heads / head.
PRESETS: dict[str, dict[str, int]] = {
    "B": {"dim": 768, "n_layer": 24, "n_head": 12, "diff_layers": 6, "diff_dim": 768, "diff_adanln_layers": 2},
    "L": {"dim": 1024, "n_layer": 32, "n_head": 16, "diff_layers": 8, "diff_dim": 1024, "diff_adanln_layers": 2},
    "H": {"dim": 1280, "n_layer": 40, "n_head": 20, "diff_layers": 12, "diff_dim": 1280, "diff_adanln_layers": 3},
}
# Guidance scales of the released files (imagenet_gen README), by (size, parallel_num).
RELEASED_GUIDANCE: dict[tuple[str, int], float] = {
    ("B", 1): 3.2, ("B", 4): 3.9, ("B", 16): 6.1, ("L", 1): 4.0, ("H", 1): 4.55,
}
DEFAULT_STEPS = 100  # ``--sample-steps`` of sample_ddp*.py
DEFAULT_GUIDANCE = 4.0  # when the file is none of the released ones
CFG_SCHEDULES = ("linear", "constant")
PARALLEL_MODES = ("patch", "standard")
# The autoencoder the official model class hard-codes (``ae_d16c32``).
RELEASED_DDCONFIG: dict[str, Any] = {"double_z": False, "z_channels": 32, "in_channels": 3, "out_ch": 3, "ch": 256,
                                     "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 4}
FILE_NAME = re.compile(r"BitDance_([BLH])_(1|4|16)x", re.IGNORECASE)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class ClassModelConfig:
    family: ClassVar[str] = "class_conditional"  # its family in bitdance_core.families.registry

    name: str
    dim: int
    n_layer: int
    n_head: int
    diff_layers: int
    diff_dim: int
    diff_adanln_layers: int
    latent_dim: int = 32
    cls_token_num: int = 64
    num_classes: int = 1000
    parallel_num: int = 1
    parallel_mode: str = "patch"
    image_size: int = 256
    down_size: int = 16
    patch_size: int = 1
    time_shift: float = 1.0
    vae_ddconfig: dict[str, Any] = field(default_factory=lambda: dict(RELEASED_DDCONFIG))
    default_guidance: float = DEFAULT_GUIDANCE
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # field -> where it came from
    model_dir: str | None = field(default=None, compare=False)  # the checkpoint file (``info()`` reports it)

    def depths(self) -> tuple[int, int, int]:
        """(prior layers, head blocks, head adaLN projections): what the memory plan scales (planning/)."""
        return self.n_layer, self.diff_layers, self.diff_adanln_layers

    def with_depths(self, layers: int, blocks: int, adaln: int) -> ClassModelConfig:
        """The same model at another depth (the memory plan's shallow copy)."""
        return replace(self, n_layer=layers, diff_layers=blocks, diff_adanln_layers=adaln)

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not a multiple of n_head {self.n_head}")
        if self.parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"parallel_mode must be one of {PARALLEL_MODES}, got {self.parallel_mode!r}")
        if self.patch_size != 1:
            raise ValueError(f"patch_size {self.patch_size} is not supported (the released models use 1)")
        side = round(self.parallel_num ** 0.5)
        if self.parallel_num > 1 and (side * side != self.parallel_num or self.grid % side):
            raise ValueError(f"parallel_num {self.parallel_num} must be a square whose side divides {self.grid}")
        if self.latent_dim != self.vae_ddconfig.get("z_channels"):
            raise ValueError(f"latent_dim {self.latent_dim} differs from the autoencoder's z_channels "
                             f"{self.vae_ddconfig.get('z_channels')}")

    # ---- derived ------------------------------------------------------------------------------

    @property
    def grid(self) -> int:
        """Latent side (16 at 256x256)."""
        return self.image_size // (self.down_size * self.patch_size)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def ar_steps(self) -> int:
        return self.num_tokens // self.parallel_num

    @property
    def patch_side(self) -> int:
        """Side of the square patch one AR step writes in ``patch`` order (1 for raster order)."""
        return round(self.parallel_num ** 0.5) if self.parallel_mode == "patch" else 1

    @property
    def downsample(self) -> int:
        return self.down_size * self.patch_size

    @property
    def is_released_shape(self) -> bool:  # the text-to-image size list does not apply
        return False

    @property
    def size(self) -> tuple[int, int]:
        """(height, width): the one size the model generates."""
        return self.image_size, self.image_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), 256)

    @property
    def prefix_len(self) -> int:
        """Tokens of the first forward: the class tokens, then ``parallel_num - 1`` query tokens."""
        return self.cls_token_num + self.parallel_num - 1

    @property
    def max_seq_len(self) -> int:
        """Most tokens a row's KV cache holds (the last block is never fed back)."""
        return self.prefix_len + self.num_tokens - self.parallel_num

    @property
    def kind(self) -> str:
        return "next-token" if self.parallel_num == 1 else "next-patch"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("sources")
        d.pop("model_dir")
        return d
