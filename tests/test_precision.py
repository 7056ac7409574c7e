"""The precision switch: ``auto`` follows the CPU's flags (simulated here), bf16 on a CPU recasts
the weights (not autocast) and stays within its tolerance of fp32, the detector keeps its id, and
a scan records the precision it ran at (a resumed scan at another one rescoring nothing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aigid.models.identity import detector_layout, model_id
from aigid.models.mirage import MiraGe, MiraGeConfig
from aigid.models.precision import resolve, set_precision
from aigid.models.registry import load_detector
from aigid.models.unigendet import UniGenDet, UniGenDetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# bf16 weights moved P(fake) by <= 2.3e-3 in our measurements (tiny detectors here; ViT-B/32 in
# benchmarks/test_precision.py): the documented tolerance, with room for other seeds and inputs.
BF16_TOLERANCE = 0.01

CPU = torch.device("cpu")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (40, 52, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("flags, want", [
    ((), "fp32"),                                   # a CPU without bf16 instructions
    (("avx2", "avx512f", "avx512_vnni"), "fp32"),   # AVX-512 alone is not bf16
    (("avx512f", "avx512_bf16"), "bf16"),
    (("amx_tile", "amx_bf16"), "bf16"),
])
def test_auto_follows_the_cpu_flags(flags, want):
    assert resolve("auto", CPU, flags, agreement=(True, "shown")) == want
    assert resolve("auto", CPU, flags) == "fp32"  # until this detector's agreement is shown
    assert resolve("fp32", CPU, ("amx_bf16",)) == "fp32" and resolve("bf16", CPU, ()) == "bf16"
    assert resolve("auto", torch.device("cuda"), ()) == "bf16"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve("fp8", CPU)


def test_auto_on_a_cpu_without_the_flags_changes_nothing():
    model = MiraGe(MiraGeConfig.named("tiny"), seed=0).eval()
    before = model.predict(_images(4))
    assert set_precision(model, "auto", flags=("avx2",)) == "fp32"
    assert model.prompts.text.dtype == torch.float32
    torch.testing.assert_close(model.predict(_images(4)), before, atol=0, rtol=0)


def test_bf16_recasts_the_weights_and_stays_within_tolerance():
    model = MiraGe(MiraGeConfig.named("tiny"), seed=0).eval()
    images = _images(8)
    fp32, mid, layout = model.predict(images), model_id(model), detector_layout(model)
    assert set_precision(model, "bf16") == "bf16" and model.precision == "bf16"
    assert {p.dtype for p in model.clip.visual.parameters()} == {torch.bfloat16}  # weights, not autocast
    assert model.prompts.text.dtype == torch.float32 and model.anchors().dtype == torch.float32
    bf16 = model.predict(images)
    assert bf16.dtype == torch.float32  # softmax and calibration stay fp32
    delta = (bf16 - fp32).abs().max().item()
    assert 0 < delta < BF16_TOLERANCE
    assert model_id(model) == mid and detector_layout(model) == layout  # same weights, same id
    with pytest.raises(ValueError, match="load it again"):
        set_precision(model, "fp32")


def test_unigendet_bf16_on_cpu_within_tolerance():
    model = UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval()
    images = _images(3)
    fp32 = model.predict(images)
    set_precision(model, "bf16")
    assert (model.predict(images) - fp32).abs().max().item() < BF16_TOLERANCE


def test_load_detector_takes_a_precision_and_the_scan_records_it(tiny_mirage_folder, tmp_path):
    from aigid.scanning.local import scan_to_store
    from aigid.scanning.store import ResultStore

    folder = tmp_path / "images"
    folder.mkdir()
    for i, arr in enumerate(_images(3)):
        Image.fromarray(arr).save(folder / f"{i}.png")
    out = tmp_path / "results.sqlite"
    fp32 = load_detector(str(tiny_mirage_folder))
    assert fp32.precision == "fp32"
    first = scan_to_store([folder], fp32, out=out, progress=False, num_workers=0)
    bf16 = load_detector(str(tiny_mirage_folder), precision="bf16")
    assert model_id(bf16) == model_id(fp32)
    again = scan_to_store([folder], bf16, out=out, progress=False, num_workers=0)
    assert first["scored"] == 3 and again["scored"] == 0  # resumed: nothing rescored
    with ResultStore(out, readonly=True) as store:
        assert [r["detector"]["precision"] for r in store.runs()] == ["fp32", "bf16"]


def test_eval_results_say_their_precision(tiny_mirage_folder, tmp_path):
    from aigid.evaluation.runner import evaluate

    for label in ("0_real", "1_fake"):
        (tmp_path / label).mkdir()
        for i, arr in enumerate(_images(2, seed=len(label))):
            Image.fromarray(arr).save(tmp_path / label / f"{i}.png")
    for precision in ("fp32", "bf16"):
        result = evaluate(load_detector(str(tiny_mirage_folder), precision=precision), str(tmp_path), progress=False)
        assert result["protocol"]["precision"] == precision and result["protocol"]["n_scored"] == 4


def test_agreement_counts_flips_and_auroc_change():
    from aigid.evaluation.agreement import agreement

    ref = torch.tensor([0.1, 0.4, 0.6, 0.9])
    labels = [0, 0, 1, 1]
    same = agreement(ref, ref.clone(), labels)
    assert same["flip_fraction"] == 0 and same["d_auroc"] == 0
    assert not same["within_bounds"]  # 4 images cannot show <= 0.5% flips (test_precision_record)
    moved = agreement(ref, torch.tensor([0.1, 0.55, 0.6, 0.9]), labels)  # one verdict crosses 0.5
    assert moved["flip_fraction"] == 0.25 and moved["max_abs_dp"] == pytest.approx(0.15)
    assert moved["d_auroc"] == 0 and not moved["within_bounds"]  # ranking kept, a verdict flipped
    swapped = agreement(ref, torch.tensor([0.1, 0.7, 0.6, 0.9]), labels, threshold=0.95)
    assert swapped["flip_fraction"] == 0 and swapped["d_auroc"] == pytest.approx(-0.25)
    with pytest.raises(ValueError):
        agreement(ref, ref[:3], labels)


# ONNX Runtime's dynamic int8 moved the tiny detector's P(fake) by 1.1e-2 (weights and activations
# quantised per tensor): the documented tolerance.
INT8_TOLERANCE = 0.05


def test_int8_scores_through_onnx_runtime_within_tolerance():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = MiraGe(MiraGeConfig.named("tiny"), seed=0).eval()
    images = _images(6)
    fp32, mid = model.predict(images), model_id(model)
    assert set_precision(model, "int8") == "int8"
    int8 = model.predict(images)
    assert 0 < (int8 - fp32).abs().max().item() < INT8_TOLERANCE  # a different graph, close numbers
    assert model_id(model) == mid and model.prompts.text.dtype == torch.float32  # weights as loaded
    assert set_precision(model, "fp32") == "fp32"  # back to the torch path: exactly fp32 again
    torch.testing.assert_close(model.predict(images), fp32, atol=0, rtol=0)


def test_int8_is_for_mirage_on_a_cpu():
    with pytest.raises(ValueError, match="CPU"):
        resolve("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="UniGenDet cannot be exported"):
        set_precision(UniGenDet(UniGenDetConfig.named("tiny"), seed=0).eval(), "int8")


def test_the_model_card_says_the_precision(tmp_path):
    from aigid.models.card import model_card

    model = MiraGe(MiraGeConfig.named("tiny"), seed=0).eval()
    assert "computed in fp32 on a CPU, bf16 autocast on CUDA" in model_card(model)
    set_precision(model, "bf16")
    card = model_card(model)
    assert "## Precision" in card and "computed in bf16" in card and '| "int8"' in card


def test_model_id_is_hashed_once_until_a_tensor_or_the_config_changes(monkeypatch):
    from aigid.models import identity

    model = MiraGe(MiraGeConfig.named("tiny"), seed=0).eval()
    calls = []
    real = identity.fingerprint
    monkeypatch.setattr(identity, "fingerprint", lambda *a: calls.append(1) or real(*a))
    first = model_id(model)
    assert model_id(model) == first and len(calls) == 1  # kept on the detector
    with torch.no_grad():
        model.prompts.text.add_(1.0)  # an in-place step: the version counter moves
    moved = model_id(model)
    assert moved != first and len(calls) == 2
    model.config.temperature = model.config.temperature * 2  # a config change
    assert model_id(model) not in (first, moved) and len(calls) == 3
    twin = __import__("copy").deepcopy(model)  # new storages: hashed afresh, same bytes, same id
    assert model_id(twin) == model_id(model) and len(calls) == 4
