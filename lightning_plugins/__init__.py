"""lightning-plugins: FP8 training, continual forgetting and ready LightningModules for Lightning.

Sub-packages:
    ``lightning_plugins.fp8``        FP8 numerics (pure torch; planned)
    ``lightning_plugins.callbacks``  Lightning callbacks (continual forgetting; planned)
    ``lightning_plugins.modules``    LightningModules and DataModules
"""

__version__ = "0.1.0"

# The FP8 precision plugin, and the Trainer(precision="fp8-msamp") string (see precision/registration.py).
from lightning_plugins.precision import MSAMPFabricPrecision, MSAMPPrecision  # noqa: E402
from lightning_plugins.precision.registration import register_on_import as _register_on_import  # noqa: E402

_register_on_import()

__all__ = ["MSAMPFabricPrecision", "MSAMPPrecision", "__version__"]
