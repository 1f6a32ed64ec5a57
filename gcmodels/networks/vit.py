"""Vision transformers (torchvision's ``VisionTransformer``: ``vit_b_16``, or a small one for CPU
runs), explained at the patch tokens entering the last block's attention.

Grad-CAM needs a layer whose gradient carries the class: after the last block only the class
token reaches the classifier, so the patch tokens there get no gradient; entering the last block
the class token's attention reaches every patch token. The block reads them through its first
layer norm only (``ln_1``), and a layer norm's input gradient is orthogonal to its input (the
output does not change when the input is shifted or scaled), so ``sum_d dy/dx_pd * x_pd`` is
exactly 0 for every patch token ``x_p`` of the block's input: the element-wise Grad-CAM of the
GC loss would be identically zero there. The explained activations are therefore the patch tokens
as ``ln_1`` leaves them, the layer pytorch-grad-cam's ViT recipe explains (``norm1``); the map is
``relu(sum_d dy/dA_pd * A_pd)`` over them, laid out on the patch grid.

Inputs of another size than ``image_size`` (the 2x composites of the GC loss, the authors'
evaluation protocol) get the position embeddings resized to their patch grid, bicubically with
the corners kept (torchvision's ``interpolate_embeddings``, which does it to a state dict for
fine-tuning at another size; here it is done in the forward pass, for each input's grid).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torchvision import models

from .base import ARCHITECTURES, Architecture, ExplainableNet, ModelOptions, Normalize

# torchvision's vit_b_16: the only size with published weights here (model.pretrained).
VIT_B_16 = {"patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072,
            "image_size": 224}


def position_embedding(embedding: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """``embedding`` ``[1, 1 + grid * grid, D]`` (class token first) for a patch grid of ``size``
    (rows, columns): the patch part resized bicubically, corners kept, where the grid differs."""
    if size == (grid, grid):
        return embedding
    patches = embedding[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=size, mode="bicubic", align_corners=True)
    return torch.cat([embedding[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)


class ViTFeatures(nn.Module):
    """torchvision's ViT up to its last encoder block's first layer norm: ``[B, 2 + N, D]``
    tokens: the class token as it enters the block (its residual adds it so), then the class
    token and the N patch tokens (in raster order) as ``ln_1`` leaves them."""

    def __init__(self, vit: models.VisionTransformer):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.blocks = vit.encoder.layers[:-1]
        self.ln_1 = vit.encoder.layers[-1].ln_1
        self.grid = vit.image_size // vit.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.conv_proj(images)
        size = tuple(patches.shape[-2:])
        tokens = torch.cat([self.class_token.expand(len(images), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        tokens = self.blocks(self.dropout(tokens + position_embedding(self.pos_embedding, self.grid, size)))
        return torch.cat([tokens[:, :1], self.ln_1(tokens)], dim=1)


class ViTHead(nn.Module):
    """The rest of the last encoder block for the class token alone (its attention over every
    token, its MLP; torchvision's modules), the final layer norm and the classifier: the patch
    tokens' own outputs of the last block reach no logit, so they are not computed."""

    def __init__(self, vit: models.VisionTransformer):
        super().__init__()
        last = vit.encoder.layers[-1]
        self.self_attention, self.dropout = last.self_attention, last.dropout
        self.ln_2, self.mlp = last.ln_2, last.mlp
        self.ln = vit.encoder.ln
        self.heads = vit.heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cls, normalized = tokens[:, :1], tokens[:, 1:]
        attended, _ = self.self_attention(normalized[:, :1], normalized, normalized, need_weights=False)
        cls = cls + self.dropout(attended)
        cls = cls + self.mlp(self.ln_2(cls))
        return self.heads(self.ln(cls)[:, 0])


class ViTNet(ExplainableNet):
    def __init__(self, vit: models.VisionTransformer):
        super().__init__(ViTFeatures(vit), ViTHead(vit), Normalize())
        self.patch_size = vit.patch_size

    def to_grid(self, activations: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        rows, columns = (side // self.patch_size for side in image_size)
        return activations[:, 2:].transpose(1, 2).reshape(len(activations), -1, rows, columns)


def _vit(num_classes: int, pooling: str = "cls", pretrained: bool = False, output_stride: int | None = None,
         patch_size: int = 16, num_layers: int = 12, num_heads: int = 12, hidden_dim: int = 768,
         mlp_dim: int = 3072, image_size: int = 224) -> ExplainableNet:
    sizes = {"patch_size": patch_size, "num_layers": num_layers, "num_heads": num_heads, "hidden_dim": hidden_dim,
             "mlp_dim": mlp_dim, "image_size": image_size}
    if pretrained:
        vit = models.vit_b_16(weights="DEFAULT")
        if vit.heads.head.out_features != num_classes:
            vit.heads.head = nn.Linear(hidden_dim, num_classes)
    else:
        vit = models.VisionTransformer(**sizes, num_classes=num_classes)
    return ViTNet(vit)


class ViTOptions(ModelOptions):
    """``model=vit``: torchvision's VisionTransformer of the given sizes; ``image_size`` is the side
    its position embeddings are made for (other sides resize them)."""

    # The class token's output is what the classifier reads: no pooling to choose.
    pooling: Literal["cls"]
    # The explained layer has a cell per patch: its stride is the patch size.
    output_stride: Literal[None] = None
    patch_size: Annotated[int, Field(ge=1)]
    num_layers: Annotated[int, Field(ge=1)]
    num_heads: Annotated[int, Field(ge=1)]
    hidden_dim: Annotated[int, Field(ge=1)]
    mlp_dim: Annotated[int, Field(ge=1)]
    image_size: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def consistent_sizes(self) -> ViTOptions:
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"model.hidden_dim={self.hidden_dim} must be a multiple of model.num_heads="
                             f"{self.num_heads} (each head takes an equal share)")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size={self.image_size} must be a multiple of model.patch_size="
                             f"{self.patch_size}")
        sizes = {key: getattr(self, key) for key in VIT_B_16}
        if self.pretrained and sizes != VIT_B_16:
            raise ValueError(f"model.pretrained=true loads torchvision's vit_b_16, whose sizes are {VIT_B_16}; "
                             f"these are {sizes} (model=vit_b_16 sets them)")
        return self


ARCHITECTURES.register("vit", ViTOptions)(Architecture(_vit, lambda model: model["patch_size"]))
