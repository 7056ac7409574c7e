"""Aligned fakes: real images reconstructed through a VAE (Rajan et al., 2025).

Each fake differs from its real twin only by what the autoencoder of a latent diffusion model
leaves behind, so a detector trained on such pairs must learn the generator's fingerprint and not
the content. Point ``make_aligned`` at any diffusers ``AutoencoderKL`` (a local folder or a hub id
already in the cache, e.g. the Stable Diffusion VAE; downloaded only with ``download=True``);
``fit_tiny_vae`` trains a small one on the spot for offline demos.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from aigid.data.images import ImageError, load_rgb
from aigid.data.labelled import IMAGE_EXTENSIONS


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _to_image(x: torch.Tensor) -> Image.Image:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def _cached_folder(repo_id: str) -> Optional[str]:
    """The local snapshot folder holding a hub repo's VAE (its root or a pipeline's ``vae/``), or
    None when its config is not in the hub cache. Filesystem only: a hub id goes to diffusers as
    this folder, since even ``local_files_only`` hub calls build request headers, and
    huggingface_hub 2.x may then fetch its agent registry from the hub."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    for name in ("config.json", "vae/config.json"):
        try:  # cache_dir explicit: old hubs bind their default at import
            hit = try_to_load_from_cache(repo_id, name, cache_dir=HF_HUB_CACHE)
        except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
            return None
        if isinstance(hit, str) and os.path.isfile(hit):
            return os.path.dirname(hit)
    return None


def load_vae(name_or_path: str, device: str = "cpu", download: bool = False):
    """A diffusers ``AutoencoderKL`` from a local folder, or a hub id already in the local cache.

    Nothing is fetched unless ``download=True`` (the CLI's ``--allow-download``); a pipeline repo or
    folder with the VAE in ``vae/`` is accepted either way.
    """
    if os.path.isdir(name_or_path):
        folder = name_or_path
    else:
        folder = _cached_folder(name_or_path) if name_or_path.count("/") == 1 else None
        if folder is None and not download:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise FileNotFoundError(
                f"VAE {name_or_path!r} is neither a local folder nor a hub id in the cache "
                f"({HF_HUB_CACHE}); pass --allow-download (download=True) to fetch it")
    from diffusers import AutoencoderKL  # after the checks above: its import alone takes seconds

    if folder is not None:
        sources = [(folder, {"subfolder": "vae"} if os.path.isdir(os.path.join(folder, "vae")) else {})]
    else:  # download allowed: a VAE repo, else a pipeline's vae/
        sources = [(name_or_path, {}), (name_or_path, {"subfolder": "vae"})]
    err: Exception = FileNotFoundError(name_or_path)
    for source, kwargs in sources:
        try:
            vae = AutoencoderKL.from_pretrained(source, local_files_only=not download, **kwargs)
            return vae.to(device).eval()
        except (OSError, ValueError) as e:
            err = e
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise FileNotFoundError(f"cannot load a VAE from {name_or_path!r}: {first_line}") from err


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """Encode to the posterior mode and decode; images in [-1, 1], sides padded to the VAE stride."""
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = images.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    x = torch.nn.functional.pad(images, (0, pw, 0, ph), mode="reflect") if ph or pw else images
    x = x.to(vae.device, vae.dtype)
    out = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return out[..., :h, :w].float().cpu()


def fit_tiny_vae(images: torch.Tensor, steps: int = 300, batch_size: int = 16, seed: int = 0,
                 kl_weight: float = 1e-6, progress: bool = False):
    """Train a small ``AutoencoderKL`` (4× downsampling, 4 latent channels) on images in [-1, 1]."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), sample_size=images.shape[-1],
    )
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="fit VAE", disable=not progress):
        x = images[torch.randint(0, images.shape[0], (batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=None)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval()


def _images_under(root: str) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(dirpath, name)


def make_aligned(real_dir: str, out_dir: str, vae, paths: Optional[Sequence[str]] = None,
                 progress: bool = True, download: bool = False) -> dict:
    """Write the VAE reconstruction of every image under ``real_dir`` to ``out_dir`` as PNG.

    The relative layout is kept (``a/b.jpg`` → ``a/b.png``). Unreadable files are listed with a
    reason in ``out_dir/errors.jsonl`` and skipped. ``vae``: a model, or a name for
    :func:`load_vae` (``download`` is passed on). Returns counts.
    """
    from tqdm.auto import tqdm

    if isinstance(vae, str):
        vae = load_vae(vae, download=download)
    os.makedirs(out_dir, exist_ok=True)
    written, errors = 0, []
    for path in tqdm(list(paths or _images_under(real_dir)), desc="aligned fakes", disable=not progress):
        rel = os.path.splitext(os.path.relpath(path, real_dir))[0] + ".png"
        try:
            img = load_rgb(path)
        except ImageError as err:
            errors.append({"path": path, "error": str(err)})
            continue
        fake = _to_image(reconstruct(vae, _to_tensor(img)[None])[0])
        target = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fake.save(target)
        written += 1
    with open(os.path.join(out_dir, "errors.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in errors)
    return {"written": written, "errors": len(errors)}
