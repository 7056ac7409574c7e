"""Compile-time evidence for the Triton kernels (``benchmarks/compile_report.py``), on a CPU.

Triton compiles for ``GPUTarget("cuda", 90, 32)`` (sm_90a) and ``("cuda", 80, 32)`` without a
GPU, using its bundled ptxas. The report runs in a subprocess: this session's conftest sets
``TRITON_INTERPRET=1``, under which ``@triton.jit`` builds interpreter objects that cannot be
compiled. Only a few representative launches are compiled here (one SupCon size, UniGenDet's
SMSA); ``python benchmarks/compile_report.py`` does the whole grid.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])  # benchmarks/: loaded by path, whatever the working directory
import compile_report as cr

out = {}
for tag, dev in cr.DEVICES.items():
    out[tag] = cr.report(dev, cr.representative_shapes())

# Planted bugs, compiled for sm_90a: a tile too small for a warpgroup (BLOCK_M = 16, one warp:
# Triton falls back to mma.sync) and an accumulator far too big for registers (spills).
launches = cr.enumerate_launches(cr.H100, cr.representative_shapes()[:1])
fwd = next(l for l in launches if l.kernel == "_supcon_fwd_kernel")
wk = next(l for l in launches if l.kernel == "_supcon_bwd_weights_kernel")
small = dataclasses.replace(fwd, kwargs=dict(fwd.kwargs, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16,
                                             num_warps=1))
spill = dataclasses.replace(wk, kwargs=dict(wk.kwargs, BLOCK_M=256, BLOCK_N=256, num_warps=4))
planted = []
for launch in (small, spill):
    rec = vars(cr.analyse(cr.H100, [launch])[0])
    rec["has_main_dot"] = True
    rec["problems"] = cr.check(rec, cr.H100)
    planted.append(rec)
out["planted"] = planted
json.dump(out, sys.stdout, default=str)
"""


def _can_compile() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"Triton cannot compile ahead of time on this install: {e}"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists():
        return f"Triton's bundled ptxas is missing ({bin_dir}): no GPU target can be compiled"
    return None


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    reason = _can_compile()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(ROOT / "benchmarks")],
                         cwd=tmp_path_factory.mktemp("compile"), env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.parametrize("tag", ["sm90a", "sm80"])
def test_kernels_compile_without_spills_or_smem_overflow(reports, tag):
    """Catches a tile/warps/stages choice that spills registers to local memory or asks for
    more shared memory per block than the GPU has (the kernel would fail to launch)."""
    doc = reports[tag]
    names = {k["kernel"] for k in doc["kernels"]}
    assert {"_supcon_fwd_kernel", "_supcon_bwd_weights_kernel",
            "_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"} <= names
    assert doc["problems"] == []
    for k in doc["kernels"]:
        assert k["spill_bytes"] == 0 and k["sass"].get("STL", 0) == 0, k["kernel"]
        assert 0 < k["shared_bytes"] <= doc["device"]["smem_per_block"] or not k["mma"]
        assert k["ctas_per_sm"] >= 1


def test_every_main_dot_is_wgmma_on_sm90a_and_mma_sync_on_sm80(reports):
    """Catches a 16-bit dot that left Hopper's warpgroup MMA (a tile under 64 rows per
    warpgroup, an fp32 operand, a layout Triton cannot feed to wgmma): on sm_90a it would run on
    the older mma.sync path at a fraction of the tensor-core throughput."""
    for k in reports["sm90a"]["kernels"]:
        if k["has_main_dot"]:
            assert any(s.startswith("wgmma") for s in k["mma"]), (k["kernel"], k["mma"])
            assert k["sass"].get("HGMMA", 0) > 0, k["kernel"]
    for k in reports["sm80"]["kernels"]:
        if k["has_main_dot"]:
            assert any(s.startswith("mma.sync m16n8k16") for s in k["mma"]), k["kernel"]


def test_waves_and_flop_ratio_follow_the_grid(reports):
    """Catches a waves/FLOP model detached from the launch: SupCon's forward at N=4096, M=65536
    launches 64 row blocks × its key splits; its tiles divide the sizes, so the executed MMA
    work is the useful work plus only the per-source padding of the 2 anchor columns."""
    fwd = next(k for k in reports["sm90a"]["kernels"] if k["kernel"] == "_supcon_fwd_kernel")
    launch = next(l for l in fwd["launches"] if l["origin"] == "bench N4096 M65536")
    assert launch["grid"][0] == 4096 // fwd["constexprs"]["BLOCK_M"]
    slots = fwd["ctas_per_sm"] * 132
    assert launch["waves"] == pytest.approx(launch["ctas"] / slots, abs=1e-3)
    assert 1.0 <= launch["mma_over_useful"] < 1.01


def test_supcon_forward_split_fills_one_wave_and_matches_the_compiled_occupancy(reports):
    """Catches a split-K choice that spills a few CTAs into a second, mostly idle wave (the old
    rule launched 320 CTAs on 264 slots, 1.21 waves), and an occupancy constant in the kernel
    module that no longer matches what the compiled forward kernel fits per SM."""
    from aigid.kernels import supcon_bank
    fwd = next(k for k in reports["sm90a"]["kernels"] if k["kernel"] == "_supcon_fwd_kernel")
    assert fwd["ctas_per_sm"] == supcon_bank.FWD_CTAS_PER_SM["16-bit"]
    launch = next(l for l in fwd["launches"] if l["origin"] == "bench N4096 M65536")
    assert 0.9 <= launch["waves"] <= 1.0


def test_supcon_backward_recomputes_each_logit_once(reports):
    """Catches a backward that recomputes logits more than once (the fused dq pass did 3× at
    D = 768 plus a second pass for dk, 2.0× the useful MMA work) or whose gradient-weight
    tiles leave the GPU idle: at N=4096, M=65536 every chunk launch must be several waves."""
    wk = [k for k in reports["sm90a"]["kernels"] if k["kernel"] == "_supcon_bwd_weights_kernel"]
    launches = [l for k in wk for l in k["launches"] if l["origin"] == "bench N4096 M65536"]
    assert launches
    useful = sum(l["useful_flops"] for l in launches)
    assert useful == 2 * 4096 * (4096 + 2 + 65536) * 768  # every key column, once
    assert sum(l["mma_flops"] for l in launches) / useful < 1.01
    assert min(l["waves"] for l in launches if l["useful_flops"] > 1e10) >= 4


def test_check_flags_planted_bugs(reports):
    """Catches a check that passes everything: a one-warp 16-row tile must be reported as
    'no wgmma' and a 256×256 fp32 logit tile on 4 warps as a spill."""
    small, spill = reports["planted"]
    assert not any(s.startswith("wgmma") for s in small["mma"])
    assert any("no wgmma" in p for p in small["problems"])
    assert spill["spill_bytes"] > 0
    assert any("spills" in p for p in spill["problems"])


def test_smsa_tma_variant_compiles_on_sm90a_and_sm80_stays_on_pointers(reports):
    """Catches a TMA variant that never reaches the sm_90a compile (descriptors dropped by the
    recorder, TMA configs pruned away, a pre_hook not run so every tile gets the placeholder
    block shape), one that compiles without bulk tensor copies (descriptor loads lowered to
    plain loads), spills or loses wgmma, and TMA leaking into sm_80 launches."""
    smsa = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
    tma = [k for k in reports["sm90a"]["kernels"]
           if k["kernel"] in smsa and k["constexprs"].get("USE_TMA")]
    assert {k["kernel"] for k in tma} == set(smsa)
    for k in tma:
        assert k["tma"] and k["sass"].get("UTMALDG", 0) > 0, k["kernel"]
        assert k["spill_bytes"] == 0 and k["sass"].get("STL", 0) == 0, k["kernel"]
        assert any(s.startswith("wgmma") for s in k["mma"]), k["kernel"]
        assert k["sass"].get("HGMMA", 0) > 0, k["kernel"]
    # every pointer tile the autotuner times on sm_90a has its TMA twin
    tiles = lambda ks: {(k["kernel"], k["constexprs"]["BLOCK_M"], k["constexprs"]["BLOCK_N"],
                         k["constexprs"].get("SPLITS"), k["num_warps"], k["num_stages"])
                        for k in ks}
    pointer = [k for k in reports["sm90a"]["kernels"]
               if k["kernel"] in smsa and not k["constexprs"].get("USE_TMA")]
    assert tiles(pointer) == tiles(tma)
    for k in reports["sm80"]["kernels"]:
        if k["kernel"] in smsa:
            assert not k["tma"] and not k["constexprs"].get("USE_TMA"), k["kernel"]
            assert not k["constexprs"].get("TMA_OK"), k["kernel"]
