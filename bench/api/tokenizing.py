"""The image-tokenizer contract: images in [0, 1] to a grid of discrete ids and back.

A tokenizer is a plugin of kind "tokenizer" owned by another plugin: an encoder that
reads token ids (MAGE reads a frozen VQGAN's ids) or a decoder that predicts them (SLATE
predicts a dVAE's ids). The owner names it in its own params and builds it with
`ocl_bench.run.registry.build_tokenizer`, so one tokenizer implementation serves every
model that needs it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from ocl_bench.api.errors import ConfigError
from ocl_bench.api.plugin import ModelPart


class ImageTokenizer(ModelPart, nn.Module):
    """Base class of tokenizer plugins.

    Subclasses set `name`, `Params`, `vocab_size` and `downsample` (pixels per token side)
    and implement `encode`, `decode` and `embed`. A tokenizer that learns alongside the
    model (SLATE's dVAE) sets `trainable = True` and returns its own losses from `losses`.
    """

    kind: ClassVar[str] = "tokenizer"
    trainable: ClassVar[bool] = False
    vocab_size: int
    downsample: int

    def __init__(self, params: Any) -> None:
        super().__init__()
        self.params = params

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The token grid (rows, cols) for `image_size`; sides must divide by `downsample`."""
        h, w = image_size
        if h % self.downsample or w % self.downsample:
            raise ConfigError(
                f"tokenizer '{self.name}' needs image sides divisible by {self.downsample}, "
                f"got {h}x{w}"
            )
        return h // self.downsample, w // self.downsample

    def encode(self, images: Tensor) -> Tensor:
        """Token ids [B, h, w] (int64) of images [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def embed(self, ids: Tensor) -> Tensor:
        """Codebook vectors [B, C, h, w] of ids [B, h, w]."""
        raise NotImplementedError

    def decode(self, ids: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] from ids [B, h, w]."""
        raise NotImplementedError

    def losses(self, images: Tensor) -> dict[str, Tensor]:
        """The tokenizer's own training losses on `images` (none for a frozen tokenizer)."""
        return {}
