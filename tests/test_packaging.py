"""No name of ours shadows an installed distribution, and ``aigid.kernels`` imports the same way in
every install: editable, a built wheel, a plain source checkout.

The clash this guards against: transformers >= 5.25 requires Hugging Face's ``kernels``; a Python
started in the repository root has the root first on ``sys.path``, so a top-level ``kernels/``
with an ``__init__.py`` won the import and broke transformers and diffusers (kernels/README.md).
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders pytest or ``python -m`` put on sys.path: the repo root (cwd), tests/, benchmarks/.
PATH_FOLDERS = (ROOT / "tests", ROOT / "benchmarks")
KERNEL_TESTS = ["test_supcon_reference.py", "test_supcon_bank_kernel.py", "test_supcon_small_kernel.py",
                "test_smsa_attention_kernel.py", "test_packed_attention.py"]


def _hf_kernels_location() -> Path | None:
    """Where the installed distribution ``kernels`` keeps its package, or None when not installed."""
    try:
        dist = md.distribution("kernels")
    except md.PackageNotFoundError:
        return None
    init = next(f for f in dist.files if str(f).replace("\\", "/") == "kernels/__init__.py")
    return Path(dist.locate_file(init)).resolve().parent


def importlib_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _run(args, cwd, env=None, timeout=600) -> str:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args} in {cwd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


# What a Python started in the repo root imports: `kernels` is the installed one (or, without it,
# only a namespace portion of our folder), and the kernels' own package comes from our folder.
_PROBE = r"""
import json, sys
import kernels
out = {"kernels_file": getattr(kernels, "__file__", None)}
from diffusers import AutoencoderKL
if sys.argv[1] == "1":
    import aigid.export.hf
import aigid, aigid.kernels.reference as ref
out["aigid"] = aigid.__file__
out["reference"] = ref.__file__
print(json.dumps(out))
"""


def test_top_level_folders_are_not_regular_packages():
    """Catches an ``__init__.py`` put back into kernels/, tests/ or benchmarks/: from the repo root
    it would win over any installed distribution of that name (kernels, the HF package, first)."""
    regular = sorted(p.name for p in ROOT.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and (p / "__init__.py").exists())
    assert regular == ["aigid"]


def test_helper_modules_on_sys_path_shadow_nothing_installed_or_stdlib():
    """Catches a helper module in tests/ or benchmarks/ (both put on sys.path by pytest) named like
    an installed top-level module or a standard-library one, which it would silently replace."""
    installed = set(md.packages_distributions())
    clashes = [f"{p.relative_to(ROOT)}" for folder in PATH_FOLDERS for p in folder.glob("*.py")
               if p.stem != "conftest" and (p.stem in installed or p.stem in sys.stdlib_module_names)]
    assert not clashes


def test_repo_root_python_imports_installed_kernels_diffusers_hf_and_ours():
    """Catches the shadowing itself, as users meet it: from the repo root, diffusers' VAE, aigid.export.hf
    (transformers) and aigid.kernels import together, and ``kernels`` is Hugging Face's."""
    with_hf = importlib_available("transformers")
    out = json.loads(_run([sys.executable, "-c", _PROBE, "1" if with_hf else "0"], cwd=ROOT))
    hf = _hf_kernels_location()
    if hf is not None:
        assert Path(out["kernels_file"]).resolve().parent == hf
    else:  # only our folder, as a namespace portion: no module file of ours named `kernels`
        assert out["kernels_file"] is None
    assert Path(out["reference"]).resolve() == ROOT / "kernels" / "reference.py"


def test_editable_install_finds_the_kernels_from_anywhere(tmp_path):
    """Catches an editable install that cannot import ``aigid.kernels`` outside the repo root (the
    setuptools finder needs the link aigid/kernels -> ../kernels, not a package_dir mapping)."""
    # Every metadata folder named aigid: from the repo root, the build's aigid.egg-info comes first.
    records = [json.loads(d.read_text("direct_url.json") or "{}") for d in md.distributions(name="aigid")]
    if not any(r.get("dir_info", {}).get("editable") for r in records):
        pytest.skip("aigid is not installed in editable mode here (the wheel test covers installs)")
    out = _run([sys.executable, "-c", "import aigid.kernels.reference as r; print(r.__file__)"], cwd=tmp_path)
    assert Path(out.strip()).resolve() == ROOT / "kernels" / "reference.py"


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A venv with no aigid: this environment's packages reach it through a .pth line, which adds
    their folder without running its .pth files (so the editable aigid finder stays out)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv).strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "outer_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


@pytest.mark.slow
def test_source_checkout_without_install(bare_venv):
    """Catches ``aigid.kernels`` needing an install step: a plain checkout run from its root imports
    it through the link, beside the installed HF ``kernels``."""
    py = bare_venv / "bin" / "python"
    out = json.loads(_run([str(py), "-c", _PROBE, "1" if importlib_available("transformers") else "0"], cwd=ROOT))
    assert Path(out["aigid"]).resolve() == ROOT / "aigid" / "__init__.py"
    assert Path(out["reference"]).resolve() == ROOT / "kernels" / "reference.py"
    hf = _hf_kernels_location()
    assert (Path(out["kernels_file"]).resolve().parent == hf) if hf else out["kernels_file"] is None


@pytest.mark.slow
def test_built_wheel_ships_every_package_and_passes_the_kernel_tests(bare_venv, tmp_path):
    """Catches a wheel missing aigid.kernels (or shipping a top-level ``kernels/`` that would
    shadow HF's in site-packages), a package left out of setup.py (aigid.provenance once was), or
    kernels that only work from the source tree."""
    if not importlib_available("setuptools"):
        pytest.skip("setuptools is not installed here: the wheel cannot be built offline")
    # Built from a clean copy: an in-tree build reuses build/lib, where files from an earlier build
    # would hide a package that setup.py no longer ships.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
          str(src)], cwd=tmp_path)
    (wheel,) = wheels.glob("aigid-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")]
    assert {f"aigid/kernels/{k}.py" for k in ("reference", "supcon_bank", "supcon_small", "smsa_attention")} \
        <= set(names)
    packages = {str(p.parent.relative_to(ROOT)).replace(os.sep, "/") for p in (ROOT / "aigid").rglob("__init__.py")}
    assert {p for p in packages if f"{p}/__init__.py" not in names} == set()
    assert [n for n in names if n.startswith("aigid/models/configs/") and n.endswith(".json")]

    py = bare_venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel)],
         cwd=tmp_path)
    where = _run([str(py), "-c", "import aigid.kernels.reference as r, aigid.provenance; print(r.__file__)"],
                 cwd=tmp_path).strip()
    assert Path(where).resolve() == Path(site).resolve() / "aigid" / "kernels" / "reference.py"
    # The kernel tests, run outside the repo root so that `aigid` can only come from the wheel.
    out = _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *[str(ROOT / "tests" / t) for t in KERNEL_TESTS]], cwd=tmp_path, timeout=900)
    assert " passed" in out and " failed" not in out
