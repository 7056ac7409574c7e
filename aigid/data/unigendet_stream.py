"""UniGenDet's training stream: detection and generation sources interleaved by weight, packed
to a token budget per step, sharded by rank, resumable from a small state dict.

As upstream's ``PackedDataset.__iter__`` (``data/dataset_base.py`` in UniGenDet and BAGEL):

- **Mix** ``"weighted"``: every pack opens with one sample of each source of positive weight
  (both groups are ``is_mandatory`` in ``data/configs/unigendet_GDUF.yaml``), then each further
  sample's source is drawn with probability ∝ ``det_weight : gen_weight`` (the code: 5 : 1).
  ``"paired"`` (the paper): detection and generation alternate and a pack holds as many of each.
  These are ``GDUFConfig.mix``/``det_weight``/``gen_weight``'s semantics, with a token budget in
  place of a sample count.
- **Packing**: samples go into the pack while its token estimate stays within ``max_tokens``
  (upstream's ``max_num_tokens``); the first one that does not fit closes the pack and opens the
  next (upstream buffers it; so do we). A sample above ``max_tokens_per_sample`` is skipped and
  counted (``too_long``). The estimate (:class:`TokenCounter`) is BAGEL's: text tokens + 2 per
  text segment, ``(H/16)(W/16) + 2`` VAE tokens, and for detection ``(H'/14)(W'/14) + 2`` ViT
  tokens with ``H'×W'`` BAGEL's ViT resize of the VAE image.
- **One latent grid per pack**: the training code batches a step's generation samples on one
  latent grid, so a generation sample of another size is carried to a later pack (at most
  ``max_carry`` wait; then the pack closes and they open the next one).
- **Sharding**: each source's units are put in a seeded global order (rows shuffled; for tar and
  parquet whole files, rows kept in order, so reads stay sequential), and rank ``r`` of ``W``
  takes the contiguous slice ``[r·n/W, (r+1)·n/W)``: disjoint, and together the whole set.
  Each epoch reshuffles the rank's slice (seed, epoch), then the source starts over.
- **Resume**: :meth:`UniGenDetStream.state_dict` is the position after the last yielded pack
  (per-source epoch and offset, the mixing RNG, the carried samples as references, counters);
  :meth:`load_state_dict` on a fresh stream over the same data continues with exactly the packs
  the original would have yielded next.
- **Bad samples** (missing or undecodable image, empty caption, too long) are skipped and counted
  in ``counters``, as are the rows the readers left out (bad JSON line, empty answer, ...). A
  source none of whose samples in a whole epoch can be read raises.
"""
from __future__ import annotations

import copy
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch

from aigid.data.bagel_resize import bagel_size
from aigid.data.images import ImageError, load_rgb
from aigid.data.unigendet_sources import CaptionRecord, DetectionRecord, Unit, _Source

__all__ = ["TokenCounter", "DetSample", "GenSample", "Pack", "UniGenDetStream", "rank_slice", "MIXES"]

log = logging.getLogger(__name__)

MIXES = ("weighted", "paired")
STATE_VERSION = 1
Ref = tuple[str, int, int, int]             # (kind, epoch, file, row): a sample, reloadable


@dataclass
class TokenCounter:
    """BAGEL's per-sample token count. Defaults: BAGEL-7B (VAE 8× down, 2×2 latent patches; SigLIP
    patch 14 on ``ImageTransform(980, 224, 14)`` of the VAE image)."""
    count_text: Callable[[str], int] = len      # tokenizer length of a text (default: characters)
    vae_stride: int = 16                        # pixels per latent token side
    vit_resize: tuple[int, int, int] = (980, 224, 14)   # max_size, min_size, stride
    vit_patch: int = 14

    def text(self, text: str) -> int:
        return self.count_text(text) + 2        # <|im_start|> … <|im_end|>

    def vae(self, h: int, w: int) -> int:
        return (h // self.vae_stride) * (w // self.vae_stride) + 2

    def vit(self, h: int, w: int) -> int:
        vw, vh = bagel_size(w, h, *self.vit_resize)
        return (vh // self.vit_patch) * (vw // self.vit_patch) + 2

    def detection(self, h: int, w: int, question: str, answer: str) -> int:
        return self.vae(h, w) + self.vit(h, w) + self.text(question) + self.text(answer)

    def generation(self, h: int, w: int, prompt: str) -> int:
        return self.vae(h, w) + self.text(prompt)


@dataclass
class DetSample:
    pixels: torch.Tensor                    # (3, H, W) VAE image, as the model's preprocess gives it
    label: int                              # aigid: 1 = fake
    question: str
    explanation: str
    tokens: int
    ref: Ref


@dataclass
class GenSample:
    pixels: torch.Tensor
    prompt: str
    tokens: int
    ref: Ref


@dataclass
class Pack:
    det: list[DetSample] = field(default_factory=list)
    gen: list[GenSample] = field(default_factory=list)
    tokens: int = 0

    @property
    def gen_shape(self) -> Optional[tuple[int, ...]]:
        return tuple(self.gen[0].pixels.shape) if self.gen else None

    def count(self, kind: str) -> int:
        return len(self.det) if kind == "det" else len(self.gen)


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of n units: disjoint, together all of them."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return n * rank // world_size, n * (rank + 1) // world_size


def _shuffled(units: list[Unit], rng: random.Random, granularity: str) -> list[Unit]:
    if granularity == "row":
        out = list(units)
        rng.shuffle(out)
        return out
    files: dict[int, list[Unit]] = {}
    for u in units:                         # keeps each file's rows in their order
        files.setdefault(u[0], []).append(u)
    order = list(files)
    rng.shuffle(order)
    return [u for f in order for u in files[f]]


class _Cursor:
    """One source's position on this rank: (epoch, offset) into the epoch's order."""

    def __init__(self, source: _Source, kind: str, seed: int, rank: int, world_size: int):
        self.source, self.kind, self.seed = source, kind, seed
        glob = _shuffled(source.units, random.Random(f"aigid-unigendet:{seed}:{kind}"), source.granularity)
        start, end = rank_slice(len(glob), rank, world_size)
        self.block = glob[start:end]
        if not self.block:
            raise ValueError(f"{kind} data: {len(glob)} samples cannot give rank {rank} of {world_size} any")
        self.epoch, self.offset = 0, 0
        self._order: Optional[tuple[int, list[Unit]]] = None

    def order(self) -> list[Unit]:
        if self._order is None or self._order[0] != self.epoch:
            rng = random.Random(f"aigid-unigendet:{self.seed}:{self.kind}:epoch{self.epoch}")
            self._order = (self.epoch, _shuffled(self.block, rng, self.source.granularity))
        return self._order[1]

    def next(self) -> Ref:
        if self.offset >= len(self.block):
            self.epoch, self.offset = self.epoch + 1, 0
        unit = self.order()[self.offset]
        self.offset += 1
        return (self.kind, self.epoch, unit[0], unit[1])


class _Skip(Exception):
    """A sample that cannot be used; ``args[0]`` is its counter name."""


class UniGenDetStream:
    """Packs of detection/generation samples for one rank; iterate it for :class:`Pack` objects
    (endless: sources start a new epoch when they run out)."""

    def __init__(self, det: Optional[_Source], gen: Optional[_Source], *, transform: Callable,
                 tokens: Optional[TokenCounter] = None, max_tokens: int = 36864,
                 max_tokens_per_sample: Optional[int] = None, mix: str = "weighted",
                 det_weight: float = 5.0, gen_weight: float = 1.0, rank: int = 0, world_size: int = 1,
                 seed: int = 0, max_carry: int = 16):
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        self.weights = {"det": det_weight if det is not None else 0.0,
                        "gen": gen_weight if gen is not None else 0.0}
        if min(det_weight, gen_weight) < 0 or sum(self.weights.values()) <= 0:
            raise ValueError(f"need a source with a positive weight (det {det_weight} : gen {gen_weight})")
        if mix == "paired" and (det is None or gen is None):
            raise ValueError("mix='paired' needs both a detection and a generation source")
        self.max_tokens = int(max_tokens)
        self.max_tokens_per_sample = int(max_tokens_per_sample or max_tokens)
        if not 0 < self.max_tokens_per_sample <= self.max_tokens:
            raise ValueError(f"need 0 < max_tokens_per_sample <= max_tokens, got "
                             f"{self.max_tokens_per_sample} and {self.max_tokens}")
        self.mix, self.transform, self.tokens = mix, transform, tokens or TokenCounter()
        self.rank, self.world_size, self.seed, self.max_carry = rank, world_size, seed, max_carry
        self.sources = {k: s for k, s in (("det", det), ("gen", gen)) if s is not None}
        self._cursors = {k: _Cursor(s, k, seed, rank, world_size) for k, s in self.sources.items()}
        self._rng = random.Random(f"aigid-unigendet-mix:{seed}:{rank}")
        self._carry: list[Ref] = []
        self._loaded: dict[Ref, Union[DetSample, GenSample]] = {}   # carried samples, decoded once
        self.counters: dict[str, dict[str, int]] = {
            k: {"samples": 0, **dict(s.index_counts)} for k, s in self.sources.items()}
        self.packs = 0
        self._snapshot = self._state()

    # ---- state --------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "sources": {k: s.fingerprint() for k, s in self.sources.items()},
                "cursors": {k: {"epoch": c.epoch, "offset": c.offset} for k, c in self._cursors.items()},
                "rng": [version, list(internal), gauss], "carry": [list(r) for r in self._carry],
                "counters": copy.deepcopy(self.counters), "packs": self.packs}

    def state_dict(self) -> dict[str, Any]:
        """The position after the last pack yielded (JSON-serialisable)."""
        return copy.deepcopy(self._snapshot)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')} (this code reads {STATE_VERSION})")
        mine = self._state()
        for key in ("seed", "rank", "world_size", "sources"):
            if state[key] != mine[key]:
                raise ValueError(f"stream state is for another {key}: {state[key]!r}, this stream has "
                                 f"{mine[key]!r}; resume with the same data, seed and ranks")
        for k, c in self._cursors.items():
            c.epoch, c.offset = state["cursors"][k]["epoch"], state["cursors"][k]["offset"]
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._carry = [tuple(r) for r in state["carry"]]
        self._loaded = {}
        self.counters = copy.deepcopy(state["counters"])
        self.packs = state["packs"]
        self._snapshot = self._state()

    # ---- samples ------------------------------------------------------------------------------
    def _pixels(self, image: Union[str, bytes]) -> torch.Tensor:
        if isinstance(image, str) and not os.path.isfile(image):
            raise _Skip("missing_image")
        try:
            return self.transform(load_rgb(image))
        except ImageError:
            raise _Skip("corrupt_image") from None

    def _load(self, ref: Ref) -> Union[DetSample, GenSample]:
        kind, epoch, fi, row = ref
        rec = self.sources[kind].read((fi, row), epoch)
        if isinstance(rec, DetectionRecord):
            px = self._pixels(rec.image)
            n = self.tokens.detection(px.shape[-2], px.shape[-1], rec.question, rec.explanation)
            sample: Union[DetSample, GenSample] = DetSample(px, rec.label, rec.question, rec.explanation, n, ref)
        else:
            assert isinstance(rec, CaptionRecord)
            if not rec.caption:
                raise _Skip("empty_caption")
            px = self._pixels(rec.image)
            sample = GenSample(px, rec.caption, self.tokens.generation(px.shape[-2], px.shape[-1], rec.caption), ref)
        if sample.tokens > self.max_tokens_per_sample:
            raise _Skip("too_long")
        return sample

    def _next(self, kind: str) -> Union[DetSample, GenSample]:
        """The source's next usable sample; unusable ones are counted and passed over."""
        cursor = self._cursors[kind]
        for _ in range(len(cursor.block) + 1):
            ref = cursor.next()
            try:
                return self._load(ref)
            except _Skip as why:
                self._count(kind, why.args[0], ref)
        raise RuntimeError(f"{kind} data: no usable sample in a whole epoch on rank {self.rank} "
                           f"({self.counters[kind]})")

    def _count(self, kind: str, reason: str, ref: Ref) -> None:
        self.counters[kind][reason] = self.counters[kind].get(reason, 0) + 1
        log.debug("skipped %s sample %s: %s", kind, self.sources[kind].describe(ref[2:]), reason)

    def _carried(self, ref: Ref) -> Optional[Union[DetSample, GenSample]]:
        if ref in self._loaded:
            return self._loaded.pop(ref)
        try:                                # after a resume: decoded again, same sample
            return self._load(ref)
        except _Skip as why:
            self._count(ref[0], why.args[0], ref)
            return None

    # ---- packing ------------------------------------------------------------------------------
    def _fits(self, pack: Pack, s: Union[DetSample, GenSample]) -> str:
        if pack.tokens + s.tokens > self.max_tokens:
            return "budget"
        if isinstance(s, GenSample) and pack.gen and tuple(s.pixels.shape) != pack.gen_shape:
            return "size"
        return ""

    def _add(self, pack: Pack, s: Union[DetSample, GenSample]) -> None:
        (pack.det if isinstance(s, DetSample) else pack.gen).append(s)
        pack.tokens += s.tokens

    def _place(self, pack: Pack, kind: str) -> bool:
        """Take the source's next sample into the pack or carry it; False closes the pack."""
        s = self._next(kind)
        why = self._fits(pack, s)
        if not why:
            self._add(pack, s)
            return True
        self._carry.append(s.ref)
        self._loaded[s.ref] = s
        return why == "size" and len(self._carry) < self.max_carry

    def _draw(self, pack: Pack) -> str:
        if self.mix == "paired":
            return "det" if len(pack.det) <= len(pack.gen) else "gen"
        if self.weights["det"] <= 0 or self.weights["gen"] <= 0:
            return "det" if self.weights["det"] > 0 else "gen"
        p_det = self.weights["det"] / (self.weights["det"] + self.weights["gen"])
        return "det" if self._rng.random() < p_det else "gen"

    def _pack(self) -> Pack:
        pack = Pack()
        waiting, self._carry = self._carry, []
        for ref in waiting:                 # carried samples first, in order (upstream: its buffer)
            s = self._carried(ref)
            if s is None:
                continue
            if self._fits(pack, s):
                self._carry.append(ref)
                self._loaded[ref] = s
            else:
                self._add(pack, s)
        open_ = True
        if self.mix == "weighted":          # one of each source, as upstream's mandatory groups
            for kind, w in self.weights.items():
                if w > 0 and open_ and not pack.count(kind):
                    open_ = self._place(pack, kind)
        while open_:
            open_ = self._place(pack, self._draw(pack))
        if self.mix == "paired":            # a surplus sample waits for its partner
            while len(pack.det) != len(pack.gen):
                side = pack.det if len(pack.det) > len(pack.gen) else pack.gen
                s = side.pop()
                pack.tokens -= s.tokens
                self._carry.insert(0, s.ref)
                self._loaded[s.ref] = s
            if not pack.det:
                raise ValueError(f"max_tokens={self.max_tokens} cannot hold a detection and a generation "
                                 "sample together (mix='paired'): raise it")
        return pack

    def __iter__(self) -> Iterator[Pack]:
        while True:
            pack = self._pack()
            self.packs += 1
            for s in pack.det + pack.gen:
                self.counters["det" if isinstance(s, DetSample) else "gen"]["samples"] += 1
            self._snapshot = self._state()
            yield pack

    def close(self) -> None:
        for s in self.sources.values():
            if hasattr(s, "close"):
                s.close()
