"""Answer decoding for UniGenDet's detection samples: KV-cached, an uncached reference, and the
public evaluation's verdict parser.

Cached decoding follows the upstream ``modeling/bagel/bagel.py`` ``generate_text`` (called by
``eval/inferencer.py`` ``gen_text``) of GitHub ``Zhangyr2022/UniGenDet``: the context is run once
into a cache, then each step feeds one token per sample at its sample's next RoPE id
(``packed_query_position_ids + 1`` per step), attends to that sample's cached keys/values, and
appends its own. Upstream feeds ``<|im_start|>`` as the first step's query; here it is already the
last token of the prefilled pack, so the prefill's hidden state at ``answer_last`` gives the first
token — the same computation. Upstream chooses tokens by argmax (``do_sample=False``, its
evaluation's default) or by multinomial sampling of ``softmax(logits / temperature)``, and stops
at ``<|im_end|>`` for batch 1 only; here every token is chosen by :func:`next_token` exactly as
``UniGenDet.explain`` does (repetition penalty, temperature, top-k, top-p) and each sample stops
at its own ``<|im_end|>``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from aigid.models.unigendet.inputs import DetInputs
from aigid.models.unigendet.mot import KVCache
from aigid.models.unigendet.sampling import next_token

__all__ = ["decode_answers", "decode_answers_uncached", "parse_verdict"]


def _prepared(det: DetInputs) -> tuple[DetInputs, list[list[int]]]:
    """A copy of ``det`` whose answers are open (no ``<|im_end|>``), and their given tokens."""
    n = len(det)
    if det.answer_ids is None:
        prefixes = [[] for _ in range(n)]
    else:
        if det.close_answer:
            raise ValueError("decoding continues the answer: build the DetInputs with close_answer=False")
        prefixes = [list(a) for a in det.answer_ids]
    return dataclasses.replace(det, answer_ids=[list(a) for a in prefixes], close_answer=False), prefixes


def _check(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")


def _choose(model, logits: torch.Tensor, histories: list[list[int]], new: list[list[int]],
            done: list[bool], greedy: bool, temperature: float, top_k: int, top_p: float,
            penalty: float, gen: torch.Generator) -> None:
    """One token per unfinished sample, in sample order (so a seeded generator is consumed as in
    the uncached loop); ``<|im_end|>`` finishes a sample and is not kept."""
    for i, row in enumerate(logits):
        if done[i]:
            continue
        nxt = next_token(row, histories[i], greedy, temperature, top_k, top_p, penalty, gen)
        if nxt == model.tokenizer.im_end:
            done[i] = True
        else:
            histories[i].append(nxt)
            new[i].append(nxt)


@torch.no_grad()
def decode_answers(model, det: DetInputs, *, max_new_tokens: int = 256, greedy: bool = False,
                   temperature: float = 0.7, top_k: int = 20, top_p: float = 0.8,
                   repetition_penalty: float = 1.05, seed: int = 0) -> list[list[int]]:
    """The new answer tokens of each detection sample (without ``<|im_end|>``), KV-cached.

    ``det``'s answers are the given beginnings (None: empty); they count for the repetition
    penalty, as in ``UniGenDet.explain``. Same tokens as :func:`decode_answers_uncached` up to
    floating-point ties: one prefill, then one cached step per token.
    """
    _check(max_new_tokens)
    det, histories = _prepared(det)
    n = len(histories)
    new: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens == 0:
        return new
    gen = torch.Generator(device="cpu").manual_seed(seed)
    done = [False] * n
    lm = model.language_model
    cache = KVCache(reserve=max_new_tokens)
    with model._autocast():
        out = model(det=det, kv_cache=cache)
    layout = out.layout
    last = out.answer_last
    ends = layout.cu_seqlens[1:n + 1].to(last.device, torch.long) - 1
    if not torch.equal(last, ends) or layout.num_samples != n:
        raise RuntimeError("cached decoding needs each detection sample to end with its answer")
    positions = layout.position_ids[last] + 1
    logits = lm.lm_head(out.hidden[last]).float().cpu()
    for step in range(max_new_tokens):
        _choose(model, logits, histories, new, done, greedy, temperature, top_k, top_p,
                repetition_penalty, gen)
        if all(done) or step == max_new_tokens - 1:
            break
        # A finished sample is fed its last token again: its row is isolated and ignored.
        ids = torch.tensor([h[-1] if h else model.tokenizer.im_start for h in histories],
                           dtype=torch.long, device=positions.device)
        with model._autocast():
            hidden = lm.model.decode_step(lm.model.embed_tokens(ids), positions, cache)
            logits = lm.lm_head(hidden).float().cpu()
        positions = positions + 1
    return new


@torch.no_grad()
def decode_answers_uncached(model, det: DetInputs, *, max_new_tokens: int = 256, greedy: bool = False,
                            temperature: float = 0.7, top_k: int = 20, top_p: float = 0.8,
                            repetition_penalty: float = 1.05, seed: int = 0) -> list[list[int]]:
    """The reference loop: every new token re-runs the whole pack with the answers so far."""
    _check(max_new_tokens)
    det, histories = _prepared(det)
    n = len(histories)
    new: list[list[int]] = [[] for _ in range(n)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    done = [False] * n
    for _ in range(max_new_tokens):
        with model._autocast():
            out = model(det=det)
        logits = model.language_model.lm_head(out.hidden[out.answer_last]).float().cpu()
        _choose(model, logits, det.answer_ids, new, done, greedy, temperature, top_k, top_p,
                repetition_penalty, gen)
        if all(done):
            break
    return new


def parse_verdict(text: str) -> Optional[int]:
    """The verdict stated in a generated answer: 1 = fake, 0 = real (aigid's labels), None when
    the answer states neither.

    As the public ``eval/det/fakevlm_test.py`` of ``Zhangyr2022/UniGenDet``: the text is
    lower-cased; "this is a real image" anywhere → real, else "this is a fake image" → fake (real
    wins when both appear). Upstream labels are the other way round (1 = real, 0 = fake) and
    upstream leaves unparsed answers (its -1) out of the accuracy altogether.
    """
    lowered = text.lower()
    if "this is a real image" in lowered:
        return 0
    if "this is a fake image" in lowered:
        return 1
    return None
