"""The size policy: which (height, width) a checkpoint may generate. The only copy of the table.

* Released 14B checkpoints: the official list of 18 sizes (``OFFICIAL_SIZES``).
* Any other checkpoint: every size whose sides are multiples of ``downsample * patch_side``
  and whose latent sides fit the position table and the ``<|res_n|>`` tokens.
* A deployment may override either with an explicit list.
Pure Python; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# (height, width): the first 11 are the "1024px area", the last 7 the "512px area".
OFFICIAL_SIZES: tuple[tuple[int, int], ...] = (
    (2048, 512), (1920, 512), (1536, 640), (1280, 768), (1152, 896), (1024, 1024), (896, 1152),
    (768, 1280), (640, 1536), (512, 1920), (512, 2048),
    (1024, 256), (896, 256), (640, 384), (512, 512), (384, 640), (256, 896), (256, 1024),
)
POS_TABLE_ROWS = 256  # rows of the 1-D sin-cos table (reference: 4096 // 16); also the <|res_n|> range


class SizeError(ValueError):
    pass


@dataclass(frozen=True)
class SizePolicy:
    downsample: int
    patch_side: int
    max_latent_side: int = POS_TABLE_ROWS
    explicit: tuple[tuple[int, int], ...] | None = None  # when set, only these sizes
    max_side_px: int | None = None  # optional cap for grid policies (keeps the size list finite)

    @property
    def unit(self) -> int:
        return self.downsample * self.patch_side

    def allowed(self) -> list[tuple[int, int]]:
        if self.explicit is not None:
            return list(self.explicit)
        top = self.max_latent_side * self.downsample
        if self.max_side_px is not None:
            top = min(top, self.max_side_px)
        sides = range(self.unit, top + 1, self.unit)
        return [(h, w) for h in sides for w in sides]

    def check(self, height: int, width: int) -> None:
        if self.explicit is not None:
            if (height, width) not in self.explicit:
                listed = ", ".join(f"{w}x{h}" for h, w in self.explicit)
                raise SizeError(f"size {width}x{height} (WxH) is not supported; allowed: {listed}")
            return
        limit = self.max_latent_side * self.downsample
        if self.max_side_px is not None:
            limit = min(limit, self.max_side_px)
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % self.unit or v > limit:
                raise SizeError(
                    f"{name}={v} is not supported: it must be a multiple of {self.unit} "
                    f"(down-sampling {self.downsample} x patch side {self.patch_side}) between {self.unit} and {limit}"
                )

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid (h, w) for a checked size."""
        self.check(height, width)
        return height // self.downsample, width // self.downsample

    def ar_steps(self, height: int, width: int) -> int:
        h, w = self.grid(height, width)
        return (h * w) // (self.patch_side**2)


def policy_for(downsample: int, patch_side: int, released: bool, sizes=None, max_side_px=None) -> SizePolicy:
    if sizes is not None:
        explicit = tuple((int(h), int(w)) for h, w in sizes)
    elif released:
        explicit = OFFICIAL_SIZES
    else:
        explicit = None
    return SizePolicy(downsample, patch_side, explicit=explicit, max_side_px=max_side_px)
