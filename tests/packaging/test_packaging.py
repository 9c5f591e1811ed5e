"""Packaging: exactly ``lightning_plugins.*`` is installed, from a wheel and from an editable install."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = {"lightning_plugins": "lightning_plugins", "callbacks": "lightning_plugins/callbacks",
                "modules": "lightning_plugins/modules"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (so the checkout gets no build/ or egg-info)."""
    work = tmp_path_factory.mktemp("build")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, work / name)
    for folder in SOURCE_ROOTS:
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), "."],
        cwd=work, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel_path,) = (work / "dist").glob("lightning_plugins-*.whl")
    return wheel_path


def test_wheel_top_level_names_are_only_lightning_plugins(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    pth = "lightning_plugins-autoregister.pth"  # precision="fp8-msamp" without an import (see _autoregister.py)
    assert top_level == {"lightning_plugins", wheel.name.split("-py3")[0] + ".dist-info", pth}


def test_wheel_holds_every_source_module_under_lightning_plugins(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{installed}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, installed in SOURCE_ROOTS.items()
        for path in (REPO / folder).rglob("*.py")
    }
    assert expected - names == set()
    assert "lightning_plugins/py.typed" in names


def test_wheel_declares_console_script_and_pins(wheel):
    with zipfile.ZipFile(wheel) as archive:
        dist_info = next(n.split("/")[0] for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert "lightning-plugins = lightning_plugins.cli:main" in entry_points
    assert "Requires-Dist: torch<=2.14.1" in metadata.replace(">=2.4,", "")
    for extra in ("vision", "face", "detection", "align", "te", "dev", "all"):
        assert f"Provides-Extra: {extra}" in metadata


def test_installed_wheel_imports_from_its_own_files(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    packages = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".pth"))} - {"bin"}  # scripts
    assert packages == {"lightning_plugins"}
    probe = (
        "import lightning_plugins.callbacks as c, lightning_plugins.modules as m, importlib.util as u;"
        "print(c.__file__); print(m.__file__);"
        "print(u.find_spec('callbacks'), u.find_spec('modules'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    callbacks_file, modules_file, specs = out.stdout.splitlines()
    assert callbacks_file.startswith(str(target)) and modules_file.startswith(str(target))
    assert specs == "None None"


_NO_IMPORT_PROBE = (
    "import site, sys; site.addsitedir(sys.argv[1]);"  # as for site-packages: its .pth files run
    "import lightning.pytorch as pl; from lightning.fabric import Fabric;"
    "before = 'lightning_plugins' in sys.modules;"
    "t = pl.Trainer(precision='fp8-msamp', accelerator='cpu', logger=False);"
    "f = Fabric(precision='fp8-msamp', accelerator='cpu');"
    "import lightning_plugins;"
    "print(before, type(t.precision_plugin).__name__, t.precision_plugin.level, type(f._precision).__name__,"
    " lightning_plugins.__file__)"
)


@pytest.mark.parametrize("disabled", [False, True])
def test_wheel_install_takes_the_precision_string_without_an_import(wheel, tmp_path, disabled):
    """Before: without `import lightning_plugins`, Trainer(precision="fp8-msamp") failed with Lightning's generic
    'invalid precision' error. The wheel's .pth adds a hook that imports the plugin when the string is asked for."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
    if disabled:
        env["LIGHTNING_PLUGINS_NO_AUTOREGISTER"] = "1"
    out = subprocess.run([sys.executable, "-c", _NO_IMPORT_PROBE, str(target)], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    if disabled:
        assert out.returncode != 0 and "Precision 'fp8-msamp' is invalid" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-3000:]
    before, trainer_plugin, level, fabric_plugin, source = out.stdout.split()
    assert before == "False"  # nothing of ours was imported until the string was asked for
    assert (trainer_plugin, level, fabric_plugin) == ("MSAMPPrecision", "O2", "MSAMPFabricPrecision")
    assert source.startswith(str(target))


def test_the_autoregister_hook_costs_no_import_at_startup(tmp_path):
    """The .pth line itself: it adds the hook and imports neither torch, Lightning nor lightning_plugins."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_probe", REPO / "lightning_plugins" / "_autoregister.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / module.PTH_NAME).write_text(module.PTH_LINE)
    probe = (
        "import site, sys; site.addsitedir(sys.argv[1]);"
        "print([type(f).__name__ for f in sys.meta_path][0], [m for m in ('torch', 'lightning', 'lightning_plugins')"
        " if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "_Finder []"


def test_editable_install_exposes_only_lightning_plugins(tmp_path):
    probe = (
        "import importlib.util as u, lightning_plugins.callbacks as c, lightning_plugins.modules as m;"
        "print(c.__file__); print(m.__file__); print(u.find_spec('callbacks'), u.find_spec('modules'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    callbacks_file, modules_file, specs = out.stdout.splitlines()
    assert Path(callbacks_file) == REPO / "callbacks" / "__init__.py"
    assert Path(modules_file) == REPO / "modules" / "__init__.py"
    assert specs == "None None"
    site_packages = Path(next(p for p in sys.path if p.endswith("site-packages")))
    assert not (site_packages / "callbacks").exists() and not (site_packages / "modules").exists()
