"""KV-cached answer decoding (MoTModel.decode_step, KVCache, decode.py) against the uncached loop,
on the tiny config with random weights, and the public evaluation's verdict parser."""
import pytest
import torch
from torch import nn

from aigid.models.unigendet import DetInputs, GenInputs, UniGenDet, UniGenDetConfig
from aigid.models.unigendet.decode import decode_answers, decode_answers_uncached, parse_verdict
from aigid.models.unigendet.mot import KVCache


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """Tiny UniGenDet whose lm_head never picks <|im_end|> (a bias row of -1e4), so answers run the
    full length."""
    m = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()
    old = m.language_model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[m.tokenizer.im_end] = -1e4
    m.language_model.lm_head = head
    return m


QUESTIONS = ["q?", "Is this image real or fake?", "why", "Describe the artifacts, please."]


def _det(model, n=4, sizes=None, seed=0):
    """Detection inputs with explicit latents (no VAE) and questions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    if sizes is None:
        px = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
        lat = torch.randn(n, 4, 4, 4, generator=g)
    else:  # one image per (h, w) in pixels; latents are h/8 x w/8
        px = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in sizes]
        lat = [torch.randn(4, h // 8, w // 8, generator=g) for h, w in sizes]
        n = len(sizes)
    qs = [model.tokenizer.encode(QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    return DetInputs(px, lat, qs, [[] for _ in range(n)], close_answer=False)


def test_greedy_cached_equals_uncached_token_for_token(model):
    det = _det(model)
    with torch.no_grad():
        lengths = model(det=det).layout.sample_lengths
    assert len(set(lengths)) == len(lengths)              # every sample has its own length
    kw = dict(max_new_tokens=20, greedy=True, repetition_penalty=1.3)  # the penalty breaks loops
    cached, ref = decode_answers(model, det, **kw), decode_answers_uncached(model, det, **kw)
    assert cached == ref
    assert all(len(a) == 20 for a in cached)              # <|im_end|> suppressed: full length
    assert all(len(set(a)) > 3 for a in cached)           # non-trivial sequences
    assert len({tuple(a) for a in cached}) == len(cached)  # samples differ from each other
    assert det.answer_ids == [[] for _ in range(4)]        # the caller's inputs are not mutated


def test_sampled_cached_equals_uncached_with_the_same_seed(model):
    det = _det(model, n=3, seed=1)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    a = decode_answers(model, det, seed=7, **kw)
    assert a == decode_answers_uncached(model, det, seed=7, **kw)
    assert a != decode_answers(model, det, seed=8, **kw)   # the seed matters


def test_images_of_different_sizes_in_one_pack(model):
    det = _det(model, sizes=[(32, 32), (32, 48), (48, 32)], seed=2)
    kw = dict(max_new_tokens=16, greedy=True, repetition_penalty=1.0)
    assert decode_answers(model, det, **kw) == decode_answers_uncached(model, det, **kw)


def test_each_cached_step_matches_the_uncached_pack(model):
    """Teacher-forced: step k's cached hidden state and logits equal the full pack's at the answer's
    last token, for every sample; the cache starts with no reserve, so it grows on the way."""
    det = _det(model, n=3, seed=3)
    n, steps = 3, 12
    forced = torch.randint(0, 256, (n, steps), generator=torch.Generator().manual_seed(0))
    lm = model.language_model
    cache = KVCache(reserve=0)
    with torch.no_grad():
        out = model(det=det, kv_cache=cache)
        plain = model(det=det)
        assert torch.equal(out.hidden, plain.hidden)       # storing the cache changes nothing
        pos = out.layout.position_ids[out.answer_last] + 1
        for k in range(steps):
            hidden = lm.model.decode_step(lm.model.embed_tokens(forced[:, k]), pos + k, cache)
            ref_det = DetInputs(det.vit_pixels, det.latents, det.question_ids,
                                [forced[i, :k + 1].tolist() for i in range(n)], close_answer=False)
            ref = model(det=ref_det)
            ref_hidden = ref.hidden[ref.answer_last]
            torch.testing.assert_close(hidden, ref_hidden, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(lm.lm_head(hidden), lm.lm_head(ref_hidden), atol=1e-3, rtol=1e-4)
    assert cache.lengths == [L + steps for L in out.layout.sample_lengths]


def test_decode_step_rejects_bad_inputs_and_hidden_splits(model):
    det = _det(model, n=2)
    lm = model.language_model.model
    cache = KVCache()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="prefill"):
            lm.decode_step(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long), cache)
        model(det=det, kv_cache=cache)
        with pytest.raises(RuntimeError, match="fresh KVCache"):
            model(det=det, kv_cache=cache)
        with pytest.raises(ValueError, match="inputs_embeds"):
            lm.decode_step(torch.zeros(3, 64), torch.zeros(3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="position_ids"):
            lm.decode_step(torch.zeros(2, 64), torch.zeros(2), cache)
        gen = GenInputs([[1, 2]], torch.zeros(1, 4, model.patch_latent_dim), torch.ones(1), (2, 2))
        with pytest.raises(ValueError, match="hidden splits"):
            model(gen=gen, kv_cache=KVCache())


def test_decode_answers_edge_cases(model):
    det = _det(model, n=2)
    assert decode_answers(model, det, max_new_tokens=0) == [[], []]
    assert decode_answers(model, det, max_new_tokens=1, greedy=True) == \
        decode_answers_uncached(model, det, max_new_tokens=1, greedy=True)
    closed = DetInputs(det.vit_pixels, det.latents, det.question_ids, [[], []], close_answer=True)
    with pytest.raises(ValueError, match="close_answer"):
        decode_answers(model, closed, max_new_tokens=2)
    # A given answer beginning is continued (and counts for the repetition penalty) in both.
    begun = DetInputs(det.vit_pixels, det.latents, det.question_ids, [[84, 104], [105]], close_answer=False)
    kw = dict(max_new_tokens=8, greedy=True)
    assert decode_answers(model, begun, **kw) == decode_answers_uncached(model, begun, **kw)


def _explain_loop(model, det, max_new_tokens, **kw):
    """UniGenDet.explain's loop before caching, written out independently of decode.py."""
    from aigid.models.unigendet.sampling import next_token
    answers = [[] for _ in range(len(det))]
    gen = torch.Generator().manual_seed(kw["seed"])
    done = [False] * len(det)
    for _ in range(max_new_tokens):
        d = DetInputs(det.vit_pixels, det.latents, det.question_ids, answers, close_answer=False)
        with torch.no_grad():
            out = model(det=d)
            logits = model.language_model.lm_head(out.hidden[out.answer_last])
        for i, row in enumerate(logits):
            if not done[i]:
                nxt = next_token(row, answers[i], False, kw["temperature"], kw["top_k"], kw["top_p"],
                                 1.05, gen)
                done[i] = nxt == model.tokenizer.im_end
                answers[i] += [] if done[i] else [nxt]
        if all(done):
            break
    return answers


def test_each_sample_stops_at_its_own_im_end():
    """Without suppression, <|im_end|> ends a sample (not kept) while the others go on."""
    m = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()
    old = m.language_model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[m.tokenizer.im_end] = 4.0   # p ≈ 0.17 per step: samples stop at different steps
    m.language_model.lm_head = head
    det = _det(m, n=4, seed=5)
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=1)
    a = decode_answers(m, det, **kw)
    assert a == decode_answers_uncached(m, det, **kw) == _explain_loop(m, det, **kw)
    assert min(map(len, a)) < 12 and m.tokenizer.im_end not in sum(a, [])
    assert len(set(map(len, a))) > 1                      # the samples stopped at different steps


def test_parse_verdict_follows_the_public_eval_script():
    assert parse_verdict("This is a fake image. The shadows are wrong.") == 1
    assert parse_verdict("THIS IS A REAL IMAGE with clear outlines") == 0
    assert parse_verdict("Well, this is a real image.") == 0          # anywhere in the text
    assert parse_verdict("this is a fake image, not this is a real image") == 0  # real is checked first
    assert parse_verdict("This image is fake.") is None               # other wordings are unparsed
    assert parse_verdict("this is a  real image") is None             # the phrase verbatim only
    assert parse_verdict("") is None
