"""The string form ``precision="fp8-msamp"`` for ``Trainer`` and ``Fabric``: a minimal, reversible patch.

Lightning has no precision registry, so the string needs a patch. ``import lightning_plugins`` applies it
once; it touches only these Lightning symbols, each replaced by a thin wrapper that passes every other value
through unchanged (so a traceback shows our frame only for an error about the precision itself):

1. ``_convert_precision_to_unified_args`` (in ``lightning.fabric.connector`` and in the Trainer's
   ``accelerator_connector``, which imports it): ``"fp8-msamp"`` is accepted as a precision value.
2. ``_AcceleratorConnector._check_and_init_precision`` (Trainer) and ``_Connector._check_and_init_precision``
   (Fabric): for ``"fp8-msamp"`` they build ``MSAMPPrecision()`` / ``MSAMPFabricPrecision()``, exactly as if the
   instance had been passed in ``plugins`` (Lightning's own rules then apply, e.g. its error when both the string
   and a precision plugin are given). For Fabric with an FP8 plugin (string or instance), the strategy's gradient
   clipping includes the FP8 weight gradients and, at O2, ``fabric.setup`` swaps Adam/AdamW for the FP8 optimizer.
3. ``_AcceleratorConnector._check_strategy_and_fallback`` (Trainer): with the FP8 precision (string or instance),
   strategies it cannot train with (``"fsdp"``/FSDP1, DeepSpeed, tensor parallelism, O3 without
   ``ModelParallelStrategy``) are refused with an error naming the supported ones (:func:`check_strategy`), before
   Lightning's own checks; ``_check_and_init_precision`` checks the strategy instance again.
4. ``lightning.pytorch.Trainer.__init__.__annotations__["precision"]``: the ``Literal`` of allowed values
   gains ``"fp8-msamp"``, so that ``LightningCLI`` (jsonargparse validates against it) accepts
   ``trainer: {precision: fp8-msamp}``. This needs the patch to be applied before the CLI builds its
   parser, which ``import lightning_plugins`` does.

It also silences Lightning's model-summary warning that ``fp8-msamp`` is an unknown precision (the summary then
counts 32 bits per parameter: the size of the weights at O1 and outside the FP8 layers).

``"fp8-msamp"`` means level ``"O2"`` (the FP8-LM recipe: FP8 GEMMs, FP8 weight gradients and communication,
FP8/FP16 Adam states, FP16 master weights), which needs Adam or AdamW; pass
``plugins=[MSAMPPrecision(level="O1")]`` for other optimizers or other options.

A wheel install also applies it without an import, the first time the string is used (``_autoregister.py``).

The patch is applied only for the Lightning versions it was tested with (:data:`TESTED_LIGHTNING`);
outside them :func:`register_precision_flag` raises and ``import lightning_plugins`` warns, and the
plugin instance (``Trainer(plugins=[MSAMPPrecision(...)])``) keeps working with stock Lightning.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal, Optional, Union, get_args

from packaging.version import Version

__all__ = [
    "PRECISION_FLAG",
    "TESTED_LIGHTNING",
    "register_precision_flag",
    "unregister_precision_flag",
    "is_registered",
    "lightning_version_supported",
    "check_strategy",
]

PRECISION_FLAG = "fp8-msamp"
# [first tested, first untested): the patched private symbols were checked in each tested release.
TESTED_LIGHTNING = ("2.4.0", "2.7.0")

_ORIGINALS: dict[Any, Any] = {}
_MARK = "__lightning_plugins_original__"
_SUMMARY_WARNING = rf"Precision {PRECISION_FLAG} is not supported by the model summary"


def _lightning_version() -> str:
    import lightning

    return lightning.__version__


def lightning_version_supported(version: str | None = None) -> bool:
    """Is ``version`` (default: the installed Lightning) inside :data:`TESTED_LIGHTNING`?"""
    v = Version(version or _lightning_version())
    return Version(TESTED_LIGHTNING[0]) <= v < Version(TESTED_LIGHTNING[1])


def _unsupported(reason: str) -> RuntimeError:
    return RuntimeError(
        f"precision={PRECISION_FLAG!r} is not available: {reason}. Lightning has no precision registry, so the string "
        f"form patches private Lightning code and is enabled only for Lightning >={TESTED_LIGHTNING[0]},"
        f"<{TESTED_LIGHTNING[1]}. Pass the plugin instance instead, which works with any Lightning 2.x: "
        "Trainer(plugins=[lightning_plugins.MSAMPPrecision(level='O2')]) (or in a LightningCLI config: "
        "trainer: {plugins: [{class_path: lightning_plugins.MSAMPPrecision, init_args: {level: O2}}]})."
    )


def _targets() -> tuple[Any, Any, type, type, type]:
    import lightning.fabric.connector as fabric_connector
    import lightning.pytorch.trainer.connectors.accelerator_connector as trainer_connector
    from lightning.pytorch.trainer.trainer import Trainer

    for module in (fabric_connector, trainer_connector):
        if not callable(getattr(module, "_convert_precision_to_unified_args", None)):
            raise _unsupported(f"{module.__name__} has no _convert_precision_to_unified_args")
    connectors = (trainer_connector._AcceleratorConnector, fabric_connector._Connector)
    for connector in connectors:
        if not callable(getattr(connector, "_check_and_init_precision", None)):
            raise _unsupported(f"{connector.__name__} has no _check_and_init_precision")
    if not callable(getattr(connectors[0], "_check_strategy_and_fallback", None)):
        raise _unsupported("_AcceleratorConnector has no _check_strategy_and_fallback")
    if "precision" not in getattr(Trainer.__init__, "__annotations__", {}):
        raise _unsupported("Trainer.__init__ has no 'precision' annotation")
    return fabric_connector, trainer_connector, connectors[0], connectors[1], Trainer


def _wrap_convert(original: Any) -> Any:
    @functools.wraps(original)
    def _convert_precision_to_unified_args(precision: Any) -> Any:
        if precision == PRECISION_FLAG:
            return PRECISION_FLAG
        return original(precision)

    setattr(_convert_precision_to_unified_args, _MARK, original)
    return _convert_precision_to_unified_args


def _wrap_trainer_precision(original: Any) -> Any:
    @functools.wraps(original)
    def _check_and_init_precision(self: Any) -> Any:
        if self._precision_flag == PRECISION_FLAG and self._precision_plugin_flag is None:
            from lightning_plugins.precision.msamp import MSAMPPrecision

            self._precision_plugin_flag = MSAMPPrecision()
            self._precision_flag = "32-true"  # what Lightning records when a plugin instance is passed
        precision = original(self)
        check_strategy(self.strategy, precision)
        return precision

    setattr(_check_and_init_precision, _MARK, original)
    return _check_and_init_precision


SUPPORTED_STRATEGIES = (
    "a single device",
    "strategy='ddp' (or 'ddp_spawn', 'ddp_fork')",
    "strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) (FSDP2; required by level O3)",
)


def check_strategy(strategy: Any, precision: Any) -> None:
    """Refuse, when the Trainer is built, the strategies the FP8 plugin cannot train with (never a silent fallback).

    ``strategy`` is a strategy instance or a registered strategy name (``"fsdp"``, ``"deepspeed_stage_2"``...).

    Raises:
        ValueError: for ``strategy="fsdp"`` (FSDP1), DeepSpeed, level O3 without ``ModelParallelStrategy``, or
            ``ModelParallelStrategy`` with tensor parallelism.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    from lightning_plugins.precision.fabric import MSAMPFabricPrecision

    if not isinstance(precision, MSAMPFabricPrecision) and precision != PRECISION_FLAG:
        return
    supported = "; ".join(SUPPORTED_STRATEGIES)
    name = type(strategy).__name__
    if isinstance(strategy, str):
        name = f"strategy={strategy!r}"
        if strategy in FSDPStrategy.get_registered_strategies():
            name = f"FSDPStrategy ({name})"
        elif strategy.startswith("deepspeed"):  # the names DeepSpeedStrategy registers
            name = f"DeepSpeedStrategy ({name})"
    if isinstance(strategy, FSDPStrategy) or name.startswith("FSDPStrategy"):
        raise ValueError(
            f"precision={PRECISION_FLAG!r} does not support {name} (strategy='fsdp', FSDP1: its flat parameters "
            f"cannot hold FP8 layers' masters and scales). Supported: {supported}. For sharded FP8 training use "
            "ModelParallelStrategy and apply torch.distributed.fsdp.fully_shard in configure_model."
        )
    if isinstance(strategy, DeepSpeedStrategy) or name.startswith("DeepSpeedStrategy"):
        raise ValueError(
            f"precision={PRECISION_FLAG!r} does not support {name} (DeepSpeed keeps its own master weights and "
            f"optimizer states). Supported: {supported}."
        )
    if isinstance(strategy, str):
        return  # the rest is judged on the strategy instance
    if getattr(precision, "level", None) == "O3" and not isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            f"MSAMPPrecision(level='O3') shards the FP8 weights and needs ModelParallelStrategy (FSDP2), got {name}. "
            f"Use Trainer(strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)), or "
            "level='O2' with the other strategies."
        )
    tp = getattr(strategy, "_tensor_parallel_size", None)
    if isinstance(strategy, ModelParallelStrategy) and isinstance(tp, int) and tp > 1:
        raise ValueError(
            f"precision={PRECISION_FLAG!r} with ModelParallelStrategy supports data parallelism only "
            f"(tensor_parallel_size=1), got tensor_parallel_size={tp}. Supported: {supported}."
        )


def _wrap_trainer_strategy_check(original: Any) -> Any:
    @functools.wraps(original)
    def _check_strategy_and_fallback(self: Any) -> Any:
        # before Lightning's own checks (e.g. its "fsdp needs a GPU"), which would not name what FP8 supports
        precision = self._precision_plugin_flag if self._precision_plugin_flag is not None else self._precision_flag
        check_strategy(self._strategy_flag, precision)
        return original(self)

    setattr(_check_strategy_and_fallback, _MARK, original)
    return _check_strategy_and_fallback


def _wrap_fabric_precision(original: Any) -> Any:
    @functools.wraps(original)
    def _check_and_init_precision(self: Any) -> Any:
        from lightning_plugins.precision.fabric import MSAMPFabricPrecision

        if self._precision_input == PRECISION_FLAG and self._precision_instance is None:
            self._precision_instance = MSAMPFabricPrecision()
            self._precision_input = "32-true"
        precision = original(self)
        if isinstance(precision, MSAMPFabricPrecision):
            _fp8_aware_fabric_strategy(self.strategy, precision)
        return precision

    setattr(_check_and_init_precision, _MARK, original)
    return _check_and_init_precision


def _fp8_aware_fabric_strategy(strategy: Any, precision: Any) -> None:
    """Give this Fabric strategy instance FP8-aware clipping and the O2 optimizer swap (instance attributes only)."""
    setup_optimizer = strategy.setup_optimizer

    def clip_gradients_norm(
        module: Any, optimizer: Any, max_norm: Any, norm_type: Any = 2.0, error_if_nonfinite: bool = True
    ) -> Any:
        total = precision.clip_grad_by_norm(optimizer, max_norm, norm_type)
        if error_if_nonfinite and not bool(total.isfinite()):
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
                "set `error_if_nonfinite=False`"
            )
        return total

    def clip_gradients_value(module: Any, optimizer: Any, clip_val: Any) -> None:
        precision.clip_grad_by_value(optimizer, clip_val)

    def setup_optimizer_fp8(optimizer: Any) -> Any:
        if precision.level == "O2" and precision._module is None:
            raise RuntimeError(
                "Fabric with precision 'fp8-msamp' (level O2) swaps Adam/AdamW for the FP8 optimizer of the FP8 "
                "model: set up the model first (fabric.setup(model, optimizer) or fabric.setup_module(model) before "
                "fabric.setup_optimizers(optimizer))."
            )
        return setup_optimizer(precision.convert_optimizer(optimizer, precision._module))

    strategy.clip_gradients_norm = clip_gradients_norm
    strategy.clip_gradients_value = clip_gradients_value
    strategy.setup_optimizer = setup_optimizer_fp8
    from lightning.fabric.strategies import ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        _convert_after_parallelize(strategy, precision)


def _convert_after_parallelize(strategy: Any, precision: Any) -> None:
    """Fabric converts a module before its strategy shards it; FSDP2 needs the layers sharded first (the plugin swaps
    the sharded layer objects in place, as after a Trainer's ``configure_model``). So under Fabric's
    ``ModelParallelStrategy`` the plugin waits, and converts right after the user's ``parallelize_fn``."""
    parallelize = strategy._parallelize_fn

    def parallelize_then_convert(module: Any, device_mesh: Any) -> Any:
        return precision.convert_module(parallelize(module, device_mesh))

    strategy._parallelize_fn = parallelize_then_convert
    precision._convert_when_sharded = True


def is_registered() -> bool:
    """Is ``precision="fp8-msamp"`` currently enabled?"""
    return bool(_ORIGINALS)


def _patch(owner: Any, name: str, wrap: Any) -> None:
    current = getattr(owner, name)
    if not hasattr(current, _MARK):
        _ORIGINALS[(owner, name)] = current
        setattr(owner, name, wrap(current))


def register_precision_flag() -> None:
    """Enable ``Trainer(precision="fp8-msamp")``, ``Fabric(precision="fp8-msamp")`` and the LightningCLI value.

    Idempotent.

    Raises:
        RuntimeError: for a Lightning version outside :data:`TESTED_LIGHTNING` or without the
            expected symbols; nothing is patched then. The message says how to pass the plugin instead.
    """
    if _ORIGINALS:
        return
    version = _lightning_version()
    if not lightning_version_supported(version):
        raise _unsupported(f"Lightning {version} is not a tested version")
    fabric_module, trainer_module, trainer_connector, fabric_connector, trainer = _targets()
    annotations = trainer.__init__.__annotations__
    if PRECISION_FLAG not in _literal_values(annotations["precision"]):
        _ORIGINALS["annotation"] = annotations["precision"]
        annotations["precision"] = Optional[Union[annotations["precision"], Literal["fp8-msamp"]]]
    _patch(fabric_module, "_convert_precision_to_unified_args", _wrap_convert)
    _patch(trainer_module, "_convert_precision_to_unified_args", _wrap_convert)
    _patch(trainer_connector, "_check_and_init_precision", _wrap_trainer_precision)
    _patch(trainer_connector, "_check_strategy_and_fallback", _wrap_trainer_strategy_check)
    _patch(fabric_connector, "_check_and_init_precision", _wrap_fabric_precision)
    warnings.filterwarnings("ignore", message=_SUMMARY_WARNING, category=UserWarning)
    _ORIGINALS.setdefault("registered", True)


def unregister_precision_flag() -> None:
    """Undo :func:`register_precision_flag` (restores the original Lightning symbols)."""
    if not _ORIGINALS:
        return
    _, _, _, _, trainer = _targets()
    for key, original in _ORIGINALS.items():
        if isinstance(key, tuple):
            setattr(key[0], key[1], original)
    if "annotation" in _ORIGINALS:
        trainer.__init__.__annotations__["precision"] = _ORIGINALS["annotation"]
    _ORIGINALS.clear()


def register_on_import() -> None:
    """What ``import lightning_plugins`` runs: register, or warn (never fail an import) outside the tested range."""
    try:
        register_precision_flag()
    except RuntimeError as err:
        warnings.warn(str(err), UserWarning, stacklevel=3)


def _literal_values(tp: Any) -> set[Any]:
    args = get_args(tp)
    if not args:
        return set()
    values: set[Any] = set()
    for arg in args:
        nested = _literal_values(arg)
        values |= nested if nested else ({arg} if not isinstance(arg, type) else set())
    return values
