"""``aigid demo``: the whole pipeline on a fresh machine, offline, in a few minutes on a CPU.

Reals are crops of the photographs that ship inside scikit-image; fakes are their aligned twins,
reconstructed through a small VAE fitted on the spot (with no network there is no Stable
Diffusion VAE to download). A tiny MiraGe with a random, frozen CLIP-shaped backbone is trained
on them and scored on crops of photographs it never saw. It is a toy: it shows the machinery, not
a detector to trust.
"""
from __future__ import annotations

import copy
import json
import os
from importlib import resources
from typing import Any

import numpy as np
import torch

from aigid.data.aligned import _to_image, _to_tensor, fit_tiny_vae, reconstruct
from aigid.data.images import load_rgb
from aigid.models.mirage import MiraGeConfig
from aigid.train import TrainConfig, train

TRAIN_PHOTOS = ("astronaut.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
                "motorcycle_left.png", "ihc.png")
VAL_PHOTOS = ("coffee.png", "retina.jpg", "motorcycle_right.png")
CROP = 64

TOY_WARNING = """\
This is a toy detector: a random, frozen CLIP-shaped backbone with learned prompts, trained on
a few hundred crops of scikit-image's sample photos and their reconstructions through a small VAE
fitted on the spot. MiraGe only learns prompts, so it is as good as its frozen backbone: random
features barely see a VAE's fingerprint, and held-out numbers near chance are what to expect
here. Real use needs real CLIP weights (ViT-L/14 via open_clip, e.g.
--pretrained /path/to/open_clip_model.safetensors) and real data (GenImage-style folders, or
aligned fakes made from your own reals with `aigid make-aligned REAL_DIR OUT_DIR --vae PATH`)."""


def _crops(names, per_photo: int, rng: np.random.Generator) -> list[torch.Tensor]:
    crops = []
    for name in names:
        img = load_rgb(str(resources.files("skimage.data") / name))
        img = img.resize((max(CROP, img.width // 2), max(CROP, img.height // 2)))
        x = _to_tensor(img)
        for _ in range(per_photo):
            top = int(rng.integers(0, x.shape[1] - CROP + 1))
            left = int(rng.integers(0, x.shape[2] - CROP + 1))
            crops.append(x[:, top:top + CROP, left:left + CROP])
    return crops


def build_demo_data(root: str, per_photo: int = 40, vae_steps: int = 300, seed: int = 0,
                    progress: bool = True) -> dict[str, int]:
    """Write ``root/{train,val}/{real,fake}/*.png`` (every fake is its real twin's reconstruction)."""
    rng = np.random.default_rng(seed)
    splits = {"train": torch.stack(_crops(TRAIN_PHOTOS, per_photo, rng)),
              "val": torch.stack(_crops(VAL_PHOTOS, per_photo, rng))}
    vae = fit_tiny_vae(splits["train"], steps=vae_steps, seed=seed, progress=progress)
    counts = {}
    for split, reals in splits.items():
        fakes = torch.cat([reconstruct(vae, chunk) for chunk in reals.split(64)])
        for label, batch in (("real", reals), ("fake", fakes)):
            folder = os.path.join(root, split, label)
            os.makedirs(folder, exist_ok=True)
            for i, x in enumerate(batch):  # both classes PNG: no file-format shortcut to learn
                _to_image(x).save(os.path.join(folder, f"{i:04d}.png"))
            counts[f"{split}/{label}"] = len(batch)
    return counts


def demo_config() -> MiraGeConfig:
    cfg = MiraGeConfig.named("tiny")
    cfg.backbone = copy.deepcopy(cfg.backbone)
    cfg.backbone["model_cfg"]["vision_cfg"]["image_size"] = CROP
    return cfg


def run_demo(out: str = "aigid-demo", steps: int = 200, per_photo: int = 40, vae_steps: int = 300,
             seed: int = 0, progress: bool = True) -> dict[str, Any]:
    data = os.path.join(out, "data")
    print(f"aigid demo: building real crops and VAE-aligned fakes in {data}")
    counts = build_demo_data(data, per_photo=per_photo, vae_steps=vae_steps, seed=seed, progress=progress)
    print("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    config_path = os.path.join(out, "mirage-demo.json")
    os.makedirs(out, exist_ok=True)
    with open(config_path, "w") as f:
        json.dump(demo_config().__dict__, f, indent=2)
    detector_dir = os.path.join(out, "detector")
    print(f"aigid demo: training a tiny MiraGe for {steps} steps → {detector_dir}")
    summary = train(TrainConfig(data=data, out=detector_dir, model=config_path, epochs=10 ** 6,
                                max_steps=steps, batch_size=32, lr=0.01, seed=seed, progress=progress))
    m = summary["val"]["overall"]
    print(f"\nheld-out (photos never seen in training, {m['n']} crops): acc {m['acc']:.3f}  "
          f"real acc {m['real_acc']:.3f}  fake acc {m['fake_acc']:.3f}  AP {m['ap']:.3f}  "
          f"AUROC {m['auroc']:.3f}")
    print(f"\n{TOY_WARNING}\n\nscore images with:  aigid eval {data} --split val --detector {detector_dir}")
    return summary
