"""``aigid demo``: the whole pipeline on a fresh machine, offline, in under a minute on a small CPU.

Reals are crops of the photographs that ship inside scikit-image; fakes are their aligned twins,
reconstructed through a small VAE fitted on the spot (with no network there is no Stable
Diffusion VAE to download). A tiny MiraGe with a random, frozen CLIP-shaped backbone is trained
on them and scored on crops of photographs it never saw. It is a toy: it shows the machinery, not
a detector to trust, and ``demo_report`` says what its numbers mean whatever they come out as.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from importlib import resources
from typing import Any

import numpy as np
import torch

from aigid.data.aligned import _to_image, _to_tensor, fit_tiny_vae, reconstruct
from aigid.data.images import load_rgb
from aigid.models.mirage import MiraGeConfig
from aigid.training.mirage import TrainConfig, train

TRAIN_PHOTOS = ("astronaut.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
                "motorcycle_left.png", "ihc.png")
VAL_PHOTOS = ("coffee.png", "retina.jpg", "motorcycle_right.png")
CROP = 64
log = logging.getLogger(__name__)

NEXT_STEPS = """\
Next, with real weights: put the ViT-L/14 weights in open_clip's cache (or pass a local
checkpoint file as --pretrained), then
  aigid train DATA --pretrained openai --out runs/mirage
  aigid eval DATA --split test --detector runs/mirage
  aigid scan PHOTOS --detector runs/mirage --out results.sqlite
(DATA: GenImage-style real/fake folders, or aligned fakes from your own reals with
`aigid make-aligned REAL_DIR OUT_DIR --vae PATH`)."""


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


def build_demo_data(root: str, per_photo: int = 40, vae_steps: int = 60, seed: int = 0,
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


def run_demo(out: str = "demo-out", steps: int = 200, per_photo: int = 40, vae_steps: int = 60,
             seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Build the toy set under ``out/data``, train ``out/detector``; returns the training summary
    (its ``val`` holds the held-out metrics). ``vae_steps`` bounds the run time: each VAE step
    costs about as much as a training step on a CPU."""
    data = os.path.join(out, "data")
    log.info("demo: building real crops and VAE-aligned fakes in %s (%d VAE steps)", data, vae_steps)
    counts = build_demo_data(data, per_photo=per_photo, vae_steps=vae_steps, seed=seed, progress=progress)
    log.info("demo: %s", ", ".join(f"{k}: {v}" for k, v in counts.items()))
    config_path = os.path.join(out, "mirage-demo.json")
    os.makedirs(out, exist_ok=True)
    with open(config_path, "w") as f:
        json.dump(demo_config().__dict__, f, indent=2)
    detector_dir = os.path.join(out, "detector")
    log.info("demo: training a tiny MiraGe for %d steps into %s", steps, detector_dir)
    return train(TrainConfig(data=data, out=detector_dir, model=config_path, epochs=10 ** 6,
                             max_steps=steps, batch_size=32, lr=0.01, seed=seed, progress=progress,
                             overwrite=True))  # a rerun of the demo replaces its own toy detector


def chance_band(n_real: int, n_fake: int) -> float:
    """Two standard deviations of AUROC when scores carry no signal (the Mann-Whitney null)."""
    return 2 * math.sqrt((n_real + n_fake + 1) / (12 * n_real * n_fake))


def verdict(auroc: float, band: float) -> str:
    """What a held-out AUROC means here, in words, whichever side of chance it falls."""
    if auroc < 0.5 - band:
        return ("below chance: held-out fakes tend to score lower than reals. Prompts learned on "
                "random features fit patterns of the training photos that do not carry over to new "
                "ones, and can even point the wrong way on them")
    if auroc <= 0.5 + band:
        return "within chance: on photos it never saw, this detector cannot tell the fakes apart"
    if auroc < 0.8:
        return ("above chance but weak: some of the VAE's fingerprint survives the random features; "
                "too little to act on")
    return ("well above chance on this toy set, whose fakes all come from one small VAE; "
            "do not expect this from random features on real generators")


def demo_report(summary: dict[str, Any], out: str) -> str:
    """The demo's closing text: held-out numbers, what they mean, and what to do next."""
    m = summary["val"]["overall"]
    band = chance_band(m["n_real"], m["n_fake"])
    auroc = m["auroc"]
    data, detector = os.path.join(out, "data"), os.path.join(out, "detector")
    return (
        f"held-out (photos never seen in training, {m['n_real']} real + {m['n_fake']} fake crops):\n"
        f"  acc {m['acc']:.3f}  real acc {m['real_acc']:.3f}  fake acc {m['fake_acc']:.3f}  "
        f"AP {m['ap']:.3f}  AUROC {auroc:.3f}\n\n"
        f"AUROC is the chance that a random fake scores above a random real: 0.5 is guessing, and with "
        f"this few crops anything in {0.5 - band:.2f}..{0.5 + band:.2f} is guessing too. "
        f"{auroc:.3f} is {verdict(auroc, band)}.\n\n"
        f"This is a toy detector: a random, frozen CLIP-shaped backbone with learned prompts, trained "
        f"on {summary['steps']} steps of crops of scikit-image's sample photos and their "
        f"reconstructions through a small VAE fitted on the spot. MiraGe learns prompts only, so it "
        f"is as good as its frozen backbone, and a random one is no good.\n"
        f"Re-score it with:  aigid eval {data} --split val --detector {detector}\n\n{NEXT_STEPS}")
