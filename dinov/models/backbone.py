"""The ViT backbone: a thin, stepwise wrapper around timm's vision transformers.

This module owns how images become tokens and tokens become features, for both timm
families the project uses:

- ``timm.models.vision_transformer.VisionTransformer`` (DINOv2 family:
  ``vit_small_patch14_dinov2``, ``vit_base_patch14_reg4_dinov2``, plain ViTs), with
  learned absolute position embeddings;
- ``timm.models.eva.Eva`` (timm's DINOv3 port: ``vit_small_patch16_dinov3``,
  ``vit_large_patch16_dinov3[_qkvb]``), with rotary position embeddings (RoPE) that
  every block receives explicitly.

The forward pass is split into :meth:`Backbone.prepare_tokens` (patch embedding, iBOT
mask tokens, prefix tokens, position embeddings), :meth:`Backbone.run_blocks` (any
contiguous range of transformer blocks) and :meth:`Backbone.finalize` (final norm,
cls / patch split), so callers can run the trunk once and re-run only the last blocks
(the value estimator's aligned parameters, DESIGN.md section 3). Composed, the three
reproduce timm's own ``forward_features`` exactly.

Learned position tables (VisionTransformer) are kept at the grid they were trained at
(37x37 for official DINOv2 files, whatever a timm or our file holds) and resized for each
input grid by :meth:`Backbone.position_embedding`, with the interpolation of the family
the weights came from (``Backbone.pos_interp``, see :func:`resize_patch_positions`): a
run at 224 px never rewrites the 518 px table, so the same weights also give the
official features at 448 or 518 px.

It also owns the attention backend switch (``sdpa``, timm's default, or ``xformers``).
Weight loading lives in :mod:`dinov.models.weights`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinov import _compat  # noqa: F401  (timm imports torchvision; the shim must run first)

if TYPE_CHECKING:
    from dinov.config import ModelConfig

ATTENTION_BACKENDS = ("sdpa", "xformers")
OUTPUT_FORMATS = ("NLC", "NCHW")  # patch tokens of forward_intermediates
# How a position table is resized to another grid. ``auto`` means: from the weights that
# are loaded (dinov2 / dinov2_reg for official DINOv2 files, the recorded value for our
# checkpoints, timm otherwise).
POS_INTERPOLATIONS = ("auto", "dinov2", "dinov2_reg", "timm")
_POS_CACHE_SIZE = 8  # grids an eval backbone keeps resized tables for


@dataclass
class TokenState:
    """Tokens between blocks; lets callers run the trunk once and re-run the last blocks."""

    x: Tensor  # (B, T, D): prefix tokens first (cls, registers), then patches row-major
    rope: Tensor | None  # Eva's rotary embedding for this grid; None for VisionTransformer
    grid: tuple[int, int]  # patch grid (h, w)


@dataclass
class BackboneOutput:
    """Features after the final norm: the cls token and the patch tokens (registers dropped)."""

    cls: Tensor  # (B, D)
    patch: Tensor  # (B, h*w, D); (B, D, h, w) from forward_intermediates(output_fmt="NCHW")
    grid: tuple[int, int]


def resize_patch_positions(
    patch_pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str
) -> Tensor:
    """Resize a (1, h*w, D) table of patch positions from ``old_grid`` to ``new_grid``.

    ``mode`` is the interpolation of the family the weights were trained with, because
    the features depend on it wherever the input grid is not the table's:

    - ``dinov2``: facebookresearch/dinov2's ``interpolate_pos_encoding`` for the models
      without registers: bicubic by ``scale_factor = (new + 0.1) / old`` (its historical
      offset, which shifts the sampling positions, not only the size), no antialiasing;
    - ``dinov2_reg``: the official register models (built with ``interpolate_offset=0``,
      ``interpolate_antialias=True``): bicubic to ``size=new`` with antialiasing, which is
      also what timm does, so ``timm`` (and ``auto``) compute the same.

    Computed in fp32 and returned in the table's dtype, as both do.
    """
    if mode not in POS_INTERPOLATIONS:
        raise ValueError(f"pos_interp must be one of {POS_INTERPOLATIONS}, got {mode!r}")
    dim = patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    if mode == "dinov2":
        if old_grid[0] != old_grid[1]:
            raise ValueError(f"pos_interp=dinov2 needs a square position table, got {old_grid}")
        scale = tuple((new + 0.1) / old_grid[0] for new in new_grid)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(grid.shape[-2:]) != tuple(new_grid):  # the offset is there to make this hold
            raise RuntimeError(f"dinov2 interpolation gave {tuple(grid.shape[-2:])}, not {new_grid}")
    else:
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patch_pos.dtype)


def _timm_classes() -> tuple[type[nn.Module], type[nn.Module]]:
    # Imported lazily so that `import dinov.models` stays cheap and ordered after the shim.
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva


class Backbone(nn.Module):
    """A timm ViT (``self.model``) plus the iBOT mask token, run in explicit stages.

    State-dict keys are ``model.<timm key>`` and ``mask_token``. Images of any size work:
    the model is built with ``dynamic_img_size`` and ``dynamic_img_pad``, so position
    embeddings (or RoPE) follow the input grid and sizes not divisible by the patch are
    zero-padded on the right/bottom (see :meth:`patch_grid`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        vit_cls, eva_cls = _timm_classes()
        if not isinstance(model, (vit_cls, eva_cls)):
            raise TypeError(
                f"Backbone wraps timm VisionTransformer or Eva models, got {type(model).__name__}"
            )
        if getattr(model, "cls_token", None) is None:
            raise ValueError("Backbone needs a model with a class token (DINO uses the cls output)")
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError("Backbone needs a timm model built with dynamic_img_size=True")
        self.model = model
        self.is_eva = isinstance(model, eva_cls)
        self.embed_dim: int = int(model.embed_dim)
        patch = model.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"only square patches are supported, got {tuple(patch)}")
        self.patch_size: int = int(patch[0])
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        self.num_blocks: int = len(model.blocks)
        # iBOT: masked patch embeddings are replaced by this token (zeros init as in DINOv2).
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        self.attention = "sdpa"
        self.grad_checkpointing = False
        self.pos_interp = "timm"  # set by the weights loader from the file's family
        # Learned positions: cls (and register) rows not resized, then the patch table.
        self.pos_prefix_rows = 0 if getattr(model, "no_embed_class", True) else self.num_prefix_tokens
        self._pos_cache: dict[tuple[int, int], tuple[tuple, Tensor]] | None = None
        rope = getattr(model, "rope", None)
        if isinstance(getattr(rope, "periods", None), Tensor):
            # timm keeps DINOv3's RoPE periods out of the state dict and recomputes them;
            # official files hold their own (bf16-rounded) values and the official model
            # uses those. Persistent, so loaded values reach our checkpoints too.
            rope.register_buffer("periods", rope.periods, persistent=True)

    # ------------------------------------------------------------------ stages
    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid for an image size; ceil division because inputs are padded (dynamic_img_pad)."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None) -> TokenState:
        """Patch-embed ``images`` (B, 3, H, W), insert mask tokens, add prefix tokens and positions.

        ``masks`` is (B, h, w) or (B, h*w) bool, True where the patch is masked. As in
        DINOv2, masked patch embeddings are replaced *before* position embeddings are added,
        so a mask token still knows where it is. A float mask m blends instead,
        ``x·(1−m) + mask_token·m``: with m in {0, 1} the values equal the bool path exactly,
        and a straight-through m from a token-mask designer carries its gradient.
        """
        x = self.model.patch_embed(images)  # (B, h, w, D): NHWC because dynamic_img_size
        batch, h, w, _ = x.shape
        if masks is not None and masks.is_floating_point():
            m = self._mask_grid(masks, batch, h, w).to(x.dtype)
            x = x * (1 - m) + self.mask_token.to(x.dtype) * m
        elif masks is not None:
            x = torch.where(self._mask_grid(masks, batch, h, w), self.mask_token.to(x.dtype), x)
        if self.is_eva:
            # Eva's _pos_embed also builds the RoPE table for this (h, w) grid.
            x, rope = self.model._pos_embed(x)
        else:
            x, rope = self.model.patch_drop(self._add_positions(x)), None
        x = self.model.norm_pre(x)
        return TokenState(x=x, rope=rope, grid=(h, w))

    def _add_positions(self, x: Tensor) -> Tensor:
        """timm's ``VisionTransformer._pos_embed`` with our table resize: (B, h, w, D) -> (B, T, D)."""
        model = self.model
        batch, h, w, dim = x.shape
        x = x.reshape(batch, h * w, dim)
        prefix = [t.expand(batch, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        if model.pos_embed is None:
            return torch.cat([*prefix, x], dim=1)
        pos = self.position_embedding((h, w))
        if self.pos_prefix_rows == 0:  # no_embed_class: prefix tokens carry no position
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return model.pos_drop(x)

    # ----------------------------------------------------------- positions
    @property
    def position_grid(self) -> tuple[int, int] | None:
        """The grid of the stored position table (None: no learned table, e.g. RoPE)."""
        if getattr(self.model, "pos_embed", None) is None:
            return None
        return tuple(int(n) for n in self.model.patch_embed.grid_size)  # type: ignore[return-value]

    def set_position_grid(self, grid: tuple[int, int]) -> None:
        """Make the stored table ``grid`` (a new, zero table: the loader fills it).

        Used before loading a file whose table is of another grid than the one the
        model was built for, so the file's table is kept as it is instead of resampled.
        Call it before an optimizer holds the parameters.
        """
        grid = (int(grid[0]), int(grid[1]))
        if self.position_grid is None:
            raise ValueError("this backbone has no learned position table")
        if grid == self.position_grid:
            return
        old = self.model.pos_embed
        rows = self.pos_prefix_rows + grid[0] * grid[1]
        self.model.pos_embed = nn.Parameter(old.new_zeros(1, rows, old.shape[-1]),
                                            requires_grad=old.requires_grad)
        embed = self.model.patch_embed
        embed.grid_size = grid
        embed.num_patches = grid[0] * grid[1]
        embed.img_size = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        self._pos_cache = {} if self._pos_cache is not None else None

    def cache_positions(self, enable: bool = True) -> None:
        """Keep resized tables per grid (for frozen eval backbones: no resize per forward).

        An entry is reused only while the table is the same tensor at the same version
        and ``pos_interp`` is unchanged, so loading other weights (or any in-place
        update) recomputes it. Training never
        enables it: the table is a trained parameter there and the resize is in the graph.
        """
        self._pos_cache = {} if enable else None

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """Position rows for an input ``grid``: (1, prefix rows + h*w, D), table dtype."""
        table = self.model.pos_embed
        native = self.position_grid
        if grid == native:
            return table  # both families use the stored table as it is at its own grid
        cache = self._pos_cache
        use_cache = cache is not None and not (torch.is_grad_enabled() and table.requires_grad)
        # Which table, and which state of it, an entry was resized from.
        stamp = (id(table), table.data_ptr(), table._version, self.pos_interp)
        if use_cache and grid in cache and cache[grid][0] == stamp:
            return cache[grid][1]
        rows = self.pos_prefix_rows
        patch = resize_patch_positions(table[:, rows:], native, grid, self.pos_interp)
        pos = torch.cat([table[:, :rows], patch], dim=1) if rows else patch
        if use_cache:
            if grid not in cache and len(cache) >= _POS_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[grid] = (stamp, pos)
        return pos

    def _mask_grid(self, masks: Tensor, batch: int, h: int, w: int) -> Tensor:
        """Validate and reshape a patch mask to (B, h, w, 1) for broadcasting over channels."""
        if masks.dtype != torch.bool and not masks.is_floating_point():
            raise TypeError(f"masks must be bool or float, got {masks.dtype}")
        if tuple(masks.shape) not in ((batch, h, w), (batch, h * w)):
            raise ValueError(
                f"masks must have shape {(batch, h, w)} or {(batch, h * w)} for a {h}x{w} "
                f"patch grid, got {tuple(masks.shape)}"
            )
        return masks.reshape(batch, h, w, 1)

    def run_blocks(self, state: TokenState, start: int = 0, end: int | None = None) -> TokenState:
        """Run blocks ``start .. end-1`` (``end=None``: through the last block)."""
        end = self.num_blocks if end is None else end
        if not 0 <= start <= end <= self.num_blocks:
            raise ValueError(f"invalid block range [{start}, {end}) for {self.num_blocks} blocks")
        x = state.x
        mixed = self.is_eva and getattr(self.model, "rope_mixed", False)
        for i in range(start, end):
            block = self.model.blocks[i]
            kwargs: dict[str, Any] = {}
            if self.is_eva:
                # timm's 'mixed' RoPE holds one table per block; the others share one.
                kwargs["rope"] = state.rope[i] if mixed and state.rope is not None else state.rope
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
        return TokenState(x=x, rope=state.rope, grid=state.grid)

    def finalize(self, state: TokenState) -> BackboneOutput:
        """Final norm, then split the cls token and the patch tokens (registers dropped)."""
        x = self.model.norm(state.x)
        return BackboneOutput(cls=x[:, 0], patch=x[:, self.num_prefix_tokens :], grid=state.grid)

    def forward(self, images: Tensor, masks: Tensor | None = None) -> BackboneOutput:
        return self.finalize(self.run_blocks(self.prepare_tokens(images, masks)))

    def block_indices(self, indices: int | Sequence[int]) -> list[int]:
        """``indices`` as sorted 0-based block indices: an int ``n`` means the last ``n``
        blocks; negative entries count from the end (timm's convention)."""
        if isinstance(indices, int):
            if not 1 <= indices <= self.num_blocks:
                raise ValueError(f"n must be in [1, {self.num_blocks}], got {indices}")
            return list(range(self.num_blocks - indices, self.num_blocks))
        out = sorted({i + self.num_blocks if i < 0 else i for i in indices})
        if not out or any(not 0 <= i < self.num_blocks for i in out):
            raise ValueError(f"block indices {list(indices)} out of range for {self.num_blocks} blocks")
        return out

    def forward_intermediates(
        self,
        images: Tensor,
        indices: int | Sequence[int] = 1,
        norm: bool = True,
        output_fmt: str = "NLC",
        masks: Tensor | None = None,
    ) -> list[BackboneOutput]:
        """The outputs of the blocks ``indices`` (see :meth:`block_indices`), in block order.

        The one feature tap (in the spirit of timm's ``forward_intermediates``): the eval
        heads, the feedback heads and the online probe all read features through it. The
        trunk runs once, up to the last requested block. ``norm``: each block's tokens go
        through the final norm (what DINOv2's linear evals take; ``[-1]`` with ``norm``
        equals :meth:`forward`). ``output_fmt``: patch tokens as ``NLC`` (B, h*w, D) or
        as a ``NCHW`` map (B, D, h, w), contiguous. It does not switch off autograd, so
        callers can differentiate through the last blocks.
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
        state = self.prepare_tokens(images, masks)
        outputs, start = [], 0
        for index in self.block_indices(indices):
            state = self.run_blocks(state, start, index + 1)
            start = index + 1
            tokens = self.model.norm(state.x) if norm else state.x
            patch = tokens[:, self.num_prefix_tokens :]
            if output_fmt == "NCHW":
                h, w = state.grid
                # contiguous: the transposed view's channels-last strides slow BatchNorm down
                patch = patch.transpose(1, 2).reshape(patch.shape[0], -1, h, w).contiguous()
            outputs.append(BackboneOutput(cls=tokens[:, 0], patch=patch, grid=state.grid))
        return outputs

    # --------------------------------------------------------------- options
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (saves memory for ViT-L and larger)."""
        self.grad_checkpointing = enable

    def set_attention(self, backend: str) -> None:
        """Switch the attention kernel: ``sdpa`` (timm's default) or ``xformers`` (CUDA only)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        if backend == self.attention:
            return
        if backend == "xformers":
            require_xformers()
            use_xformers_attention(self.model)
        else:
            _restore_attention(self.model)
        self.attention = backend


# ---------------------------------------------------------------------- xformers
def require_xformers() -> None:
    """Fail early and clearly when the xformers backend cannot run here."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "model.attention='xformers' needs the xformers package: "
            "pip install 'vpretrain[xformers]' (or use model.attention=sdpa)"
        ) from err
    if not torch.cuda.is_available():
        raise RuntimeError(
            "model.attention='xformers' needs a CUDA GPU: xformers has no CPU kernels. "
            "Use model.attention=sdpa on CPU."
        )


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """Attention over (B, heads, N, head_dim) tensors through xformers' memory-efficient kernel."""
    if q.device.type != "cuda":
        raise RuntimeError(
            f"xformers attention got tensors on {q.device}; it has no CPU kernels. "
            "Use model.attention=sdpa on CPU."
        )
    import xformers.ops as xops

    # xformers wants (B, N, heads, head_dim); timm keeps heads before tokens.
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p
    )
    return out.transpose(1, 2)


def _no_mask(attn_mask: Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise NotImplementedError("the xformers backend here supports unmasked self-attention only")


def _vit_attention_forward(
    self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """timm.layers.Attention.forward with the SDPA call replaced by xformers."""
    _no_mask(attn_mask, is_causal)
    batch, tokens, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    qkv = (
        self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    )
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = _xformers_attention(q, k, v, self.attn_drop.p if self.training else 0.0)
    x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _eva_qkv(self: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eva's q, k, v projections (fused with q/v-only bias, or separate), (B, heads, N, hd)."""
    batch, tokens, _ = x.shape
    if self.qkv is None:
        return tuple(  # type: ignore[return-value]
            proj(x).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
    bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
    qkv = F.linear(x, self.qkv.weight, bias)
    return qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _eva_attention_forward(
    self: nn.Module,
    x: Tensor,
    rope: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """timm.models.eva.EvaAttention.forward with the SDPA call replaced by xformers."""
    from timm.layers import apply_rot_embed_cat

    _no_mask(attn_mask, is_causal)
    batch, tokens, channels = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    q, k, v = _eva_qkv(self, x)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        # Prefix tokens (cls, registers) carry no position: rotate patch tokens only.
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2)
        q, k = q.type_as(v), k.type_as(v)
    x = _xformers_attention(q, k, v, self.attn_drop.p if self.training else 0.0)
    x = self.norm(x.transpose(1, 2).reshape(batch, tokens, channels))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Each block's attention module with the xformers forward that replaces its own."""
    from timm.layers import Attention
    from timm.models.eva import EvaAttention

    pairs = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        # Exact type checks: a subclass may change forward in ways these copies do not know.
        if type(attn) is Attention:
            pairs.append((attn, _vit_attention_forward))
        elif type(attn) is EvaAttention:
            pairs.append((attn, _eva_attention_forward))
        else:
            raise NotImplementedError(
                f"xformers backend: block {i} uses {type(attn).__name__}, which is not supported"
            )
    return pairs


def use_xformers_attention(model: nn.Module) -> None:
    """Route every block's attention through xformers (instance-level forward override)."""
    for attn, forward in _attention_modules(model):
        attn.forward = types.MethodType(forward, attn)


def _restore_attention(model: nn.Module) -> None:
    for block in model.blocks:
        block.attn.__dict__.pop("forward", None)  # back to the class's own (SDPA) forward


# ---------------------------------------------------------------------- building
def _timm_kwargs(cfg: ModelConfig, eva: bool) -> dict[str, Any]:
    """create_model kwargs; overrides are passed only when set, under each class's names."""
    kwargs: dict[str, Any] = dict(
        pretrained=False,  # weights come only from local files (dinov.models.weights)
        img_size=cfg.img_size,
        dynamic_img_size=True,
        dynamic_img_pad=True,  # small crops not divisible by the patch would fail otherwise
        num_classes=0,
        drop_path_rate=cfg.drop_path_rate,
    )
    overrides = {
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        # VisionTransformer calls them reg_tokens, Eva num_reg_tokens.
        ("num_reg_tokens" if eva else "reg_tokens"): cfg.num_register_tokens,
        "init_values": cfg.layerscale_init,
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def _check_arch(arch: str) -> None:
    import difflib

    import timm

    if timm.is_model(arch):
        return
    # Narrow by the name's family first (vit_*, eva_*), then rank by similarity.
    family = timm.list_models(f"{arch.split('_')[0]}*") or timm.list_models()
    close = difflib.get_close_matches(arch, family, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown timm architecture {arch!r} (model.arch){hint}")


def build_backbone(cfg: ModelConfig) -> Backbone:
    """Build the configured timm ViT (random init) and wrap it; loads no weights."""
    import timm

    _check_arch(cfg.arch)
    if cfg.attention not in ATTENTION_BACKENDS:
        raise ValueError(
            f"model.attention must be one of {ATTENTION_BACKENDS}, got {cfg.attention!r}"
        )
    if cfg.attention == "xformers":
        require_xformers()  # before building: a ViT-L is slow to construct
    _, eva_cls = _timm_classes()
    # Which kwarg names apply depends on the class; the entrypoint's module tells which.
    eva = timm.models.model_entrypoint(cfg.arch).__module__ == eva_cls.__module__
    if cfg.pos_interp not in POS_INTERPOLATIONS:
        raise ValueError(
            f"model.pos_interp must be one of {POS_INTERPOLATIONS}, got {cfg.pos_interp!r}"
        )
    model = timm.create_model(cfg.arch, **_timm_kwargs(cfg, eva))
    backbone = Backbone(model)
    backbone.set_attention(cfg.attention)
    # 'auto' is settled by the weights loader; without weights the table is timm's own.
    backbone.pos_interp = "timm" if cfg.pos_interp == "auto" else cfg.pos_interp
    return backbone
