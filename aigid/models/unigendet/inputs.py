"""How UniGenDet lays samples out in one packed sequence, and what a forward pass returns.

``PackBuilder`` appends detection and generation samples as ``Split``s and records which pack
positions hold text ids, ViT tokens, VAE tokens, answer labels and the ``<|im_start|>`` read by
the detection head. Image splits carry their ``<|vision_start|>``/``<|vision_end|>`` markers
inside the split (same RoPE id, as BAGEL); the markers are text, so the model routes only
``vae_pos`` to the generation expert (``PackedLayout.with_gen_index``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from aigid.models.unigendet.tokenizer import Tokenizer
from aigid.ops.packing import PackedLayout, Split

__all__ = ["DetInputs", "GenInputs", "PackOutput", "Generated", "PackBuilder"]


Images = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class DetInputs:
    """A batch of detection samples. Images may differ in size (BAGEL keeps each image's aspect):
    give a list of per-image tensors, or one batch tensor when they share a size.

    Sample layout: ``[prefix] VAE [mid] ViT [question] <|im_start|> answer``; ``mid`` is the text
    the released DIGA script puts between the VAE and the ViT split of its teacher; a ``None``
    question skips the question split (that teacher has none)."""
    vit_pixels: Images                              # N × (3, Hv, Wv), normalised to [-1, 1]
    latents: Images                                 # N × (C, h, w) clean, scaled VAE latents
    question_ids: list[Optional[list[int]]]
    answer_ids: Optional[list[list[int]]] = None    # None: the answer split is just <|im_start|>
    close_answer: bool = True                       # append <|im_end|> to answers (False: decoding)
    prefix_ids: Optional[list[Optional[list[int]]]] = None
    mid_ids: Optional[list[Optional[list[int]]]] = None

    def __len__(self) -> int:
        return len(self.vit_pixels)


@dataclass
class GenInputs:
    """A batch of generation samples: noisy latent tokens at time t, prompts (None = unconditional)."""
    prompt_ids: list[Optional[list[int]]]
    x_t: torch.Tensor                               # (N, n_tok, p·p·C)
    t: torch.Tensor                                 # (N,)
    grid: tuple[int, int]                           # latent token grid (h/p, w/p)


@dataclass
class PackOutput:
    hidden: torch.Tensor                            # (T, H) final-normed per expert
    layer_outputs: dict[int, torch.Tensor]          # raw layer outputs (T, H)
    layout: PackedLayout
    cls_logits: Optional[torch.Tensor] = None       # (N_det, 2), class 0 = fake
    answer_logits: Optional[torch.Tensor] = None    # (n_labels, V) at answer positions
    answer_labels: Optional[torch.Tensor] = None    # (n_labels,)
    answer_last: Optional[torch.Tensor] = None      # (N_det,) position of each answer's last token
    # Pack positions of each image's ViT tokens and its ViT grid: a (N_det, n_vit) tensor and one
    # grid when every image has the same size, else lists with one entry per image.
    vit_index: Optional[Union[torch.Tensor, list[torch.Tensor]]] = None
    vit_grid: Optional[Union[tuple[int, int], list[tuple[int, int]]]] = None
    gen_vae_index: Optional[torch.Tensor] = None    # (N_gen, n_tok) positions of noisy VAE tokens
    velocity: Optional[torch.Tensor] = None         # (N_gen, n_tok, p·p·C)


@dataclass
class Generated:
    latents: torch.Tensor                           # (N, C, h, w) scaled latents
    images: Optional[torch.Tensor] = None           # (N, 3, H, W) in [0, 1] when a VAE is configured


class PackBuilder:
    """Lays samples out as ``Split``s and records where each kind of token goes."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.samples: list[list[Split]] = []
        self.text_pos: list[int] = []
        self.text_ids: list[int] = []
        self.vit_pos: list[int] = []
        self.vae_pos: list[int] = []
        self.label_pos: list[int] = []
        self.label_ids: list[int] = []
        self.cls_pos: list[int] = []
        self.answer_last: list[int] = []
        self.gen_pos: list[int] = []
        self.cur = 0

    def sample(self) -> list[Split]:
        self.samples.append([])
        return self.samples[-1]

    def text(self, ids: Sequence[int], labels: bool = False) -> int:
        ids = list(ids)
        start = self.cur
        self.samples[-1].append(Split(len(ids), "text"))
        self.text_pos.extend(range(start, start + len(ids)))
        self.text_ids.extend(ids)
        if labels:  # each position predicts the next token of its split
            self.label_pos.extend(range(start, start + len(ids) - 1))
            self.label_ids.extend(ids[1:])
        self.cur += len(ids)
        return start

    def image(self, kind: str, n: int, hidden: bool = False) -> list[int]:
        start = self.cur
        self.samples[-1].append(Split(n + 2, kind, hidden))
        self.text_pos += [start, start + n + 1]
        self.text_ids += [self.tok.vision_start, self.tok.vision_end]
        tokens = list(range(start + 1, start + 1 + n))
        (self.vit_pos if kind == "vit" else self.vae_pos).extend(tokens)
        self.cur += n + 2
        return tokens
