"""Lightning callbacks of lightning-plugins (installed as ``lightning_plugins.callbacks``)."""
