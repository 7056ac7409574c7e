"""The layout of a packed batch for the MoT backbone: which token is what, and who sees whom.

BAGEL (and UniGenDet on top of it) trains on one flat sequence of T tokens that concatenates
several samples; each sample is a list of *splits* — runs of text tokens, SigLIP ViT tokens or
VAE latent tokens. :class:`PackedLayout` is built once per batch on the host and shared by every
layer: it holds the expert routing indices, BAGEL's 1-D RoPE position ids and the visibility
rule that attention needs, so no layer ever builds a dense mask.

Visibility (``PackedLayout.dense_mask`` is the ground truth): samples never see each other;
inside a sample a query in split i reads a key in split j iff

* j < i and split j is not hidden (earlier splits are read in full), or
* j == i and (split i is an image split, or the key is not after the query: text is causal).

A *hidden* split (a noisy VAE latent being denoised) is invisible to every other split, but it
reads earlier visible splits and itself like any image split.

Position ids follow BAGEL: text tokens count up one by one; every token of an image split shares
one id and the next split continues at that id + 1; each sample starts at 0.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

import torch

__all__ = ["KINDS", "Split", "PackedLayout", "SplitPlan", "GroupPlan"]

SplitKind = Literal["text", "vit", "vae"]
KINDS: tuple[str, ...] = ("text", "vit", "vae")
Device = Optional[Union[str, torch.device]]


@dataclass(frozen=True)
class Split:
    """A run of ``length`` tokens of one ``kind`` inside a sample.

    text: causal within itself, understanding expert; vit: full within itself, understanding
    expert; vae: full within itself, generation expert. ``hidden``: invisible to every other split
    (a noisy VAE split being denoised).
    """
    length: int
    kind: SplitKind
    hidden: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"Split.length must be a positive int, got {self.length!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Split.kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.hidden, bool):
            raise TypeError(f"Split.hidden must be a bool, got {self.hidden!r}")

    @property
    def causal(self) -> bool:
        return self.kind == "text"

    @property
    def expert(self) -> str:
        """``"gen"`` for VAE tokens (generation expert), ``"und"`` otherwise."""
        return "gen" if self.kind == "vae" else "und"


@dataclass(frozen=True)
class SplitPlan:
    """Attention work for one split, in offsets relative to its sample's start.

    Queries are ``[start, end)``; keys/values are the concatenation of ``runs`` (merged contiguous
    ranges of visible earlier splits, the last run always ending at ``end`` because a split reads
    itself). A causal split's mask is bottom-right aligned over that concatenation.
    """
    start: int
    end: int
    causal: bool
    runs: tuple[tuple[int, int], ...]

    @property
    def num_keys(self) -> int:
        return sum(e - s for s, e in self.runs)


@dataclass(frozen=True)
class GroupPlan:
    """``count`` consecutive samples with identical split structure, starting at pack offset
    ``offset``, each ``length`` tokens long: one attention call per split serves all of them
    (sample b of the group is the view ``buffer[offset:offset + count*length].view(count, length,
    ...)[b]`` — a strided view, no copy)."""
    offset: int
    count: int
    length: int
    splits: tuple[SplitPlan, ...]


def _visible_runs(splits: Sequence[Split], starts: Sequence[int], i: int) -> tuple[tuple[int, int], ...]:
    """Merged [start, end) ranges (sample-relative) of the keys split ``i`` reads."""
    runs: list[list[int]] = []
    for j in range(i + 1):
        if j < i and splits[j].hidden:
            continue
        s, e = starts[j], starts[j] + splits[j].length
        if runs and runs[-1][1] == s:
            runs[-1][1] = e
        else:
            runs.append([s, e])
    return tuple((s, e) for s, e in runs)


@dataclass(eq=False)
class PackedLayout:
    """Layout of one packed batch (see the module docstring); build it with :meth:`build`."""
    samples: list[list[Split]]
    total: int                    # T, tokens in the pack
    cu_seqlens: torch.Tensor      # (B+1,) int32 sample boundaries
    und_index: torch.Tensor       # (T_und,) long, text + ViT positions (ascending)
    gen_index: torch.Tensor       # (T_gen,) long, VAE positions (ascending)
    position_ids: torch.Tensor    # (T,) long, BAGEL's 1-D RoPE ids
    _cache: dict = field(default_factory=dict, repr=False, init=False)

    def __post_init__(self) -> None:
        self._sample_starts = [0, *itertools.accumulate(sum(s.length for s in sm) for sm in self.samples)]
        self._split_starts = [[0, *itertools.accumulate(s.length for s in sm)] for sm in self.samples]
        # Largest RoPE id, known on the host (text counts up, an image split takes one id).
        self.max_position_id = max(
            sum(sp.length if sp.kind == "text" else 1 for sp in sm) - 1 for sm in self.samples)
        if self._sample_starts[-1] != self.total:
            raise ValueError(f"samples hold {self._sample_starts[-1]} tokens but total is {self.total}")
        if self.und_index.numel() + self.gen_index.numel() != self.total:
            raise ValueError(f"und_index ({self.und_index.numel()}) and gen_index ({self.gen_index.numel()}) "
                             f"must partition the {self.total} tokens")
        if self.position_ids.shape != (self.total,):
            raise ValueError(f"position_ids must be ({self.total},), got {tuple(self.position_ids.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, samples: Sequence[Sequence[Split]], device: Device = None) -> "PackedLayout":
        """Lay ``samples`` (each a non-empty sequence of :class:`Split`) out one after another."""
        if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence) or len(samples) == 0:
            raise ValueError("PackedLayout.build needs a non-empty sequence of samples")
        norm: list[list[Split]] = []
        for b, sample in enumerate(samples):
            if isinstance(sample, Split) or not isinstance(sample, Sequence) or len(sample) == 0:
                raise ValueError(f"sample {b} must be a non-empty sequence of Split, got {sample!r}")
            for i, sp in enumerate(sample):
                if not isinstance(sp, Split):
                    raise TypeError(f"sample {b}, split {i}: expected a Split, got {type(sp).__name__}")
            norm.append(list(sample))

        lengths, und, gen, pos = [], [], [], []
        offset = 0
        for sample in norm:
            next_id = 0
            for sp in sample:
                rng = torch.arange(offset, offset + sp.length)
                (gen if sp.expert == "gen" else und).append(rng)
                if sp.kind == "text":
                    pos.append(torch.arange(next_id, next_id + sp.length))
                    next_id += sp.length
                else:
                    pos.append(torch.full((sp.length,), next_id, dtype=torch.long))
                    next_id += 1
                offset += sp.length
            lengths.append(sum(sp.length for sp in sample))
        empty = torch.zeros(0, dtype=torch.long)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        return cls(
            samples=norm,
            total=offset,
            cu_seqlens=cu.to(device),
            und_index=(torch.cat(und) if und else empty).to(device),
            gen_index=(torch.cat(gen) if gen else empty).to(device),
            position_ids=torch.cat(pos).to(device),
        )

    def with_gen_index(self, gen_index: torch.Tensor) -> "PackedLayout":
        """The same layout with other tokens routed to the generation expert (e.g. BAGEL routes the
        start/end markers inside a VAE split to the understanding expert, the latents to the
        generation expert); attention and position ids are unchanged."""
        gen = torch.sort(gen_index.to(device=self.device, dtype=torch.long).flatten()).values
        if gen.numel() and not (0 <= int(gen[0]) and int(gen[-1]) < self.total):
            raise ValueError(f"gen_index must hold positions in [0, {self.total}), got "
                             f"{int(gen[0])}..{int(gen[-1])}")
        is_gen = torch.zeros(self.total, dtype=torch.bool, device=self.device)
        is_gen[gen] = True
        if int(is_gen.sum()) != gen.numel():
            raise ValueError("gen_index holds repeated positions")
        return PackedLayout(self.samples, self.total, self.cu_seqlens,
                            torch.nonzero(~is_gen).flatten(), gen, self.position_ids)

    def to(self, device: Device) -> "PackedLayout":
        """The same layout with its tensors on ``device``."""
        return PackedLayout(self.samples, self.total, self.cu_seqlens.to(device),
                            self.und_index.to(device), self.gen_index.to(device),
                            self.position_ids.to(device))

    # ------------------------------------------------------------------ queries
    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def device(self) -> torch.device:
        return self.position_ids.device

    @property
    def sample_lengths(self) -> list[int]:
        return [e - s for s, e in zip(self._sample_starts, self._sample_starts[1:])]

    @property
    def max_seqlen(self) -> int:
        return max(self.sample_lengths)

    def sample_range(self, sample: int) -> tuple[int, int]:
        """[start, end) of ``sample`` in the pack."""
        self._check_sample(sample)
        return self._sample_starts[sample], self._sample_starts[sample + 1]

    def split_range(self, sample: int, split: int) -> tuple[int, int]:
        """[start, end) of split ``split`` of ``sample`` in the pack."""
        self._check_sample(sample)
        starts = self._split_starts[sample]
        if not 0 <= split < len(self.samples[sample]):
            raise IndexError(f"sample {sample} has {len(self.samples[sample])} splits, asked for {split}")
        base = self._sample_starts[sample]
        return base + starts[split], base + starts[split + 1]

    def token_ranges(self, kind: str) -> list[tuple[int, int]]:
        """All [start, end) of the splits of ``kind``, in pack order."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return [self.split_range(b, i) for b, sample in enumerate(self.samples)
                for i, sp in enumerate(sample) if sp.kind == kind]

    def visible_runs(self, sample: int, split: int) -> list[tuple[int, int]]:
        """Merged [start, end) pack ranges of the keys that split ``split`` of ``sample`` reads;
        the last range ends at the split's end (causality inside a text split is not shown)."""
        self.split_range(sample, split)  # bounds check
        base = self._sample_starts[sample]
        runs = _visible_runs(self.samples[sample], self._split_starts[sample], split)
        return [(base + s, base + e) for s, e in runs]

    def dense_mask(self, sample: int) -> torch.Tensor:
        """(L_s, L_s) bool, True where a query (row) may attend to a key (column): the ground truth."""
        self._check_sample(sample)
        splits, starts = self.samples[sample], self._split_starts[sample]
        n = starts[-1]
        split_of = torch.repeat_interleave(torch.arange(len(splits)),
                                           torch.tensor([sp.length for sp in splits]))
        hidden = torch.tensor([sp.hidden for sp in splits])
        causal = torch.tensor([sp.causal for sp in splits])
        q_split, k_split = split_of[:, None], split_of[None, :]
        pos = torch.arange(n)
        earlier = (k_split < q_split) & ~hidden[k_split]
        same = (k_split == q_split) & (~causal[q_split] | (pos[None, :] <= pos[:, None]))
        return (earlier | same).to(self.device)

    # ------------------------------------------------------------------ attention plan
    def attention_plan(self) -> tuple[GroupPlan, ...]:
        """The split-wise attention work, cached: consecutive samples with identical structure are
        grouped so that one call per split serves the whole group."""
        plan = self._cache.get("plan")
        if plan is None:
            groups = []
            for key, members in itertools.groupby(range(self.num_samples),
                                                  key=lambda b: tuple(self.samples[b])):
                members = list(members)
                b0 = members[0]
                starts = self._split_starts[b0]
                splits = tuple(
                    SplitPlan(starts[i], starts[i + 1], sp.causal, _visible_runs(key, starts, i))
                    for i, sp in enumerate(key))
                groups.append(GroupPlan(self._sample_starts[b0], len(members), starts[-1], splits))
            plan = self._cache["plan"] = tuple(groups)
        return plan

    def cached(self, key, build):
        """``build()`` once per layout and key (e.g. index tensors per device), then reused."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _check_sample(self, sample: int) -> None:
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"the pack has {self.num_samples} samples, asked for {sample}")
