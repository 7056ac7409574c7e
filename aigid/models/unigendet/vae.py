"""UniGenDet's external VAE: the FLUX autoencoder, run as a diffusers ``AutoencoderKL``.

``spec`` is ``config.vae``. ``spec["path"]`` may name

* a diffusers ``AutoencoderKL`` folder (``config.json`` + weights);
* BAGEL's own ``ae.safetensors`` (Black Forest Labs' key layout, as loaded by ``load_ae`` in
  ByteDance-Seed/Bagel ``modeling/autoencoder.py``), or a folder holding it (a BAGEL release);

``spec["init"]`` instead builds a seeded random one for tests. A BFL file is converted with
diffusers' own LDM→diffusers VAE key conversion and loaded strictly: every tensor of the file must
land on a parameter of the right shape, and every parameter must come from the file.

Latents follow BAGEL: ``scale·(z − shift)`` with z *sampled* from the posterior (BFL's
``DiagonalGaussian(sample=True)``); ``sample=False`` gives the mode instead.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["FLUX_AE", "build_vae", "has_vae", "flux_ae_kwargs", "vae_from_bfl_state",
           "encode_latents", "decode_latents"]

logger = logging.getLogger(__name__)

BFL_FILE = "ae.safetensors"

# The FLUX AE (BAGEL's ``load_ae``: ch 128, ch_mult [1, 2, 4, 4], num_res_blocks 2, z_channels 16,
# resolution 256, no quant convs) as AutoencoderKL kwargs. BFL norms are GroupNorm(32, eps 1e-6)
# and its mid blocks carry one single-head attention, which is diffusers' default.
FLUX_AE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def _autoencoder_kl() -> type:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("UniGenDet's VAE needs diffusers: pip install diffusers") from e
    return AutoencoderKL


def _check_against_spec(blocks: int, latent_channels: Optional[int], spec: dict[str, Any], what: str) -> None:
    if 2 ** (blocks - 1) != int(spec.get("downsample", 8)):
        raise ValueError(f"{what} has {blocks} blocks (×{2 ** (blocks - 1)} down), "
                         f"config says ×{spec.get('downsample')}")
    if latent_channels is not None and spec.get("channels") is not None \
            and int(spec["channels"]) != int(latent_channels):
        raise ValueError(f"{what} has {latent_channels} latent channels, config says {spec['channels']}")


def has_vae(spec: dict[str, Any], built: Optional[nn.Module]) -> bool:
    return built is not None or bool(spec.get("path")) or bool(spec.get("init"))


def build_vae(spec: dict[str, Any]) -> nn.Module:
    """The VAE named by ``spec`` (see the module docstring), in eval mode with frozen weights."""
    AutoencoderKL = _autoencoder_kl()
    if spec.get("path"):
        bfl = _bfl_file(str(spec["path"]))
        if bfl is not None:
            from safetensors.torch import load_file
            vae = vae_from_bfl_state(load_file(bfl), spec)
            logger.info("loaded the FLUX AE (BFL layout) from %s", bfl)
        else:
            vae = AutoencoderKL.from_pretrained(spec["path"], local_files_only=True)
    elif spec.get("init"):
        init = dict(spec["init"])
        blocks = len(init.get("block_out_channels", [])) or 4
        _check_against_spec(blocks, None, spec, "vae.init")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec.get("seed", 0)))
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=int(spec.get("channels", 16)),
                                down_block_types=["DownEncoderBlock2D"] * blocks,
                                up_block_types=["UpDecoderBlock2D"] * blocks,
                                use_quant_conv=False, use_post_quant_conv=False, **init)
    else:
        raise RuntimeError("no VAE configured: set config.vae['path'] to BAGEL's ae.safetensors (or its "
                           "folder) or a local diffusers AutoencoderKL folder, or pass latents directly")
    return vae.eval().requires_grad_(False)


def _bfl_file(path: str) -> Optional[str]:
    """The BFL-layout file ``path`` names, or None for a diffusers folder.

    A BAGEL release folder holds ``ae.safetensors`` beside configs of its own, so a folder counts as
    diffusers only when its ``config.json`` says AutoencoderKL (or there is no ``ae.safetensors``)."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"vae.path {path!r}: expected a .safetensors file (BFL layout) or a folder")
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"vae.path {path!r} does not exist")
    ae, config = os.path.join(path, BFL_FILE), os.path.join(path, "config.json")
    if not os.path.isfile(ae):
        return None
    if os.path.isfile(config):
        with open(config) as f:
            if json.load(f).get("_class_name") == "AutoencoderKL":
                return None
    return ae


def flux_ae_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """FLUX_AE, overridden by ``spec["arch"]`` (tiny BFL-layout files in tests), checked against spec."""
    arch = dict(spec.get("arch") or {})
    kwargs = {**FLUX_AE, **arch}
    blocks = len(kwargs["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if key not in arch:
            kwargs[key] = (block,) * blocks
    _check_against_spec(blocks, kwargs["latent_channels"], spec, "the FLUX AE")
    return kwargs


def vae_from_bfl_state(state: dict[str, torch.Tensor], spec: dict[str, Any]) -> nn.Module:
    """An AutoencoderKL holding ``state`` (BFL keys), strictly: raises naming every tensor that is
    left over, missing or mis-shaped. Meta tensors in ``state`` give a meta model (shape checks)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    kwargs = flux_ae_kwargs(spec)
    with torch.device("meta"):
        vae = _autoencoder_kl()(**kwargs)
    expected = vae.state_dict()
    # (AutoencoderKL.from_single_file would fetch FLUX's diffusers config and load non-strictly.)
    # The converter copies what it recognises and silently drops the rest (it also accepts the
    # "first_stage_model." / "vae." prefixes of full LDM checkpoints). Converting a meta copy, whose
    # tensors are all distinct, tells which file tensor each converted one came from (the same
    # tensor, or for attention a [:, :, 0, 0] view of it).
    probes = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    origin = {id(t): k for k, t in probes.items()}
    try:
        source = {name: origin[id(t if t._base is None else t._base)]
                  for name, t in convert_ldm_vae_checkpoint(probes, kwargs).items() if t is not None}
    except KeyError as e:  # an up-sampler's bias is read by [] once its weight is there
        raise ValueError(f"the BFL-layout VAE state is missing {e.args[0]}") from e
    converted = {name: t for name, t in convert_ldm_vae_checkpoint(state, kwargs).items() if t is not None}

    unused = sorted(set(state) - set(source.values()))
    unexpected = sorted(source[n] + ("" if source[n] == n else f" (→ {n})")
                        for n in converted if n not in expected)
    missing = sorted(n for n in expected if n not in converted)
    misshaped = sorted(f"{source[n]} {tuple(state[source[n]].shape)} (→ {n}, model wants "
                       f"{tuple(expected[n].shape)})" for n, t in converted.items() if n in expected
                       and (t.shape != expected[n].shape or t.numel() != state[source[n]].numel()))
    problems = [f"{what}: {', '.join(names)}" for what, names in (
        ("not part of the FLUX AE layout", unused), ("no such parameter", unexpected),
        ("missing (diffusers names)", missing), ("mis-shaped", misshaped)) if names]
    if problems:
        raise ValueError("the BFL-layout VAE state does not fit AutoencoderKL(" + ", ".join(
            f"{k}={kwargs[k]}" for k in ("block_out_channels", "layers_per_block", "latent_channels"))
            + "):\n  " + "\n  ".join(problems))
    vae.load_state_dict(converted, strict=True, assign=True)
    return vae


def _vae_param(vae: nn.Module) -> torch.Tensor:
    return next(vae.parameters())


@torch.no_grad()
def encode_latents(vae: nn.Module, pixels: torch.Tensor, spec: dict[str, Any], *, sample: bool = True,
                   generator: Union[torch.Generator, Sequence[torch.Generator], None] = None) -> torch.Tensor:
    """[-1, 1] pixels (N, 3, H, W) → float32 latents ``scale·(z − shift)`` (N, C, h, w).

    z = mean + std·ε as in BAGEL, with ε drawn by ``generator`` on its device (the CPU when None,
    so a seed gives the same latents on any accelerator), or by one generator per image (then an
    image's latents do not depend on its batch); ``sample=False`` takes the mode (the mean)."""
    p = _vae_param(vae)
    dist = vae.encode(pixels.to(p.device, p.dtype)).latent_dist
    z = dist.mode().float()  # diffusers clamps logvar to [-30, 20]; BFL does not (moot for real images)
    if sample:
        z = z + dist.std.float() * _noise(z.shape, generator).to(z.device)
    return (z - spec.get("shift", 0.0)) * spec.get("scale", 1.0)


def _noise(shape: torch.Size,
           generator: Union[torch.Generator, Sequence[torch.Generator], None]) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} images")
    return torch.stack([_noise(shape[1:], g).cpu() for g in generator])


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """Scaled latents → images in [0, 1]."""
    p = _vae_param(vae)
    z = latents / spec.get("scale", 1.0) + spec.get("shift", 0.0)
    x = vae.decode(z.to(p.device, p.dtype)).sample
    return ((x.float() + 1) / 2).clamp(0, 1)
