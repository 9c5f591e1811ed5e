"""lightning-plugins: FP8 training, continual forgetting and ready LightningModules for Lightning.

Sub-packages:
    ``lightning_plugins.fp8``        FP8 numerics (pure torch; planned)
    ``lightning_plugins.callbacks``  Lightning callbacks (continual forgetting; planned)
    ``lightning_plugins.modules``    LightningModules and DataModules
"""

__version__ = "0.1.0"
