"""``DPOModule``: direct preference optimization with a frozen reference that never enters checkpoints."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from lightning_plugins.modules.align import ref_cache
from lightning_plugins.modules.align._common import (
    apply_lora,
    export_pretrained,
    attached_trainer,
    check_optimizer_args,
    configure_adamw,
    disable_dropout as _disable_dropout,
    enable_gradient_checkpointing,
    hparams_to_ignore,
    resolve_causal_lm,
    resolve_tokenizer,
)
from lightning_plugins.modules.losses import DPO_LOSS_TYPES, SequenceLogps, dpo_loss, sequence_logps
from lightning_plugins.modules.sharding import hf_block_types, shard_with_fsdp2

__all__ = ["DPOModule"]

log = logging.getLogger(__name__)

REFERENCE_MODES = ("copy", "adapter", "precomputed")
LOSS_TYPES = DPO_LOSS_TYPES + ("sft",)
# loss types that read ``label_smoothing`` (the others require 0, see ``losses.dpo_loss``)
_SMOOTHED = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired")
_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "nll")
_PROTOCOL = ("splits", "fingerprint", "reference_dataloader", "attach_reference_logps")
_CHECKPOINT_KEY = "dpo_reference_hash"


class DPOModule(pl.LightningModule):
    """DPO and its TRL 1.x variants on chosen/rejected pairs, one concatenated forward pass per batch.

    Batches (contract 4): right-padded ``input_ids``/``attention_mask``/``completion_mask`` of shape ``(2B, T)``,
    chosen rows first, plus ``pair_index`` and, once attached, ``ref_chosen_logps``/``ref_rejected_logps``.
    Sequence log-probs are sums over completion tokens (``losses.sequence_logps``); the loss is
    ``Σ_k w_k · mean ℓ_k`` over ``loss_type`` (TRL's list semantics, ``"sft"`` = token-mean NLL of the chosen
    completions), plus ``nll_coef`` times that NLL (RPO).

    The reference is never a registered submodule, so it is neither trained, nor counted in ``parameters()``, nor
    saved in ``state_dict``/checkpoints:

    - ``"copy"``: a frozen deep copy of the policy at construction (before LoRA wrapping). When resuming, the
      policy spec must rebuild the same starting weights (same seed for a config-dict model).
    - ``"adapter"``: the policy itself with its LoRA adapters disabled (needs ``lora``); no extra memory.
    - ``"precomputed"``: at fit start, reference log-probs of every split of the DataModule (which must implement
      ``splits``/``fingerprint``/``reference_dataloader``/``attach_reference_logps``) are read from the
      ``ref_cache`` folder or computed with the starting policy and stored there; no reference stays in memory.
    - an ``nn.Module`` (Python API): that frozen model.

    Logged under ``train/`` (per step) and ``val/`` (per epoch) with TRL's names: ``loss``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies`` (strict ``>``), ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected``, ``logits/chosen``, ``logits/rejected`` (mean over completion tokens of the vocabulary-mean
    logit) and ``nll`` (when an NLL term is on).

    Args:
        model: policy spec (config dict, local folder, ``.gguf``, alias; see ``loading``) or an ``nn.Module``.
        tokenizer: tokenizer spec or object.
        reference: ``"copy"``, ``"adapter"``, ``"precomputed"`` or a frozen ``nn.Module``.
        beta: ``β`` of the implicit reward (``τ`` for IPO).
        loss_type: one name or a list (see ``losses.DPO_LOSS_TYPES``, plus ``"sft"``).
        loss_weights: one weight per loss type (default all 1).
        label_smoothing: ``ε`` for ``cdpo``/``robust``/``exo_pair``/``aot``/``aot_unpaired`` (error otherwise).
        nll_coef: weight of the chosen-completion token-mean NLL added to the loss (RPO); 0 disables it.
        lr / weight_decay / warmup_steps / betas: AdamW settings (see ``SFTModule``).
        lora: peft ``LoraConfig`` arguments to train adapters only.
        cache_dir: folder of the precomputed reference cache (default ``ref_cache.default_cache_dir()``).
        gradient_checkpointing: non-reentrant activation checkpointing of the policy.
        disable_dropout: set every dropout probability of the policy and reference to 0 (TRL's default).
        export_dir: when set, the trained policy (LoRA merged) and tokenizer are written there as a Hugging Face
            folder at the end of ``fit``.
    """

    def __init__(
        self,
        model: Union[str, dict[str, Any], nn.Module],
        tokenizer: Union[str, Any] = "char",
        reference: Union[str, nn.Module] = "copy",
        beta: float = 0.1,
        loss_type: Union[str, list[str]] = "sigmoid",
        loss_weights: Optional[list[float]] = None,
        label_smoothing: float = 0.0,
        nll_coef: float = 0.0,
        lr: float = 5e-7,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        lora: Optional[dict[str, Any]] = None,
        cache_dir: Optional[str] = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        export_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_optimizer_args(lr, weight_decay, warmup_steps, betas)
        self.loss_types, self.loss_weights = _check_losses(loss_type, loss_weights, beta, label_smoothing, nll_coef)
        if isinstance(reference, str) and reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES} or an nn.Module, got {reference!r}.")
        if not isinstance(reference, (str, nn.Module)):
            raise TypeError(f"reference must be one of {REFERENCE_MODES} or an nn.Module, got "
                            f"{type(reference).__name__}.")
        if reference == "adapter" and lora is None:
            raise ValueError("reference='adapter' uses the policy with its LoRA adapters disabled: pass `lora` (e.g. "
                             "{'r': 8, 'target_modules': ['q_proj', 'v_proj']}) or use reference='copy'.")
        self.save_hyperparameters(ignore=hparams_to_ignore(model=model, tokenizer=tokenizer, reference=reference))
        self.tokenizer = resolve_tokenizer(tokenizer)
        policy = resolve_causal_lm(model, self.tokenizer, "DPOModule")
        if isinstance(reference, nn.Module) and reference is policy:
            raise ValueError("reference is the policy object itself; pass a separate frozen copy or use "
                             "reference='copy'.")
        self.reference_mode = reference if isinstance(reference, str) else "module"
        # a plain dict is not registered by nn.Module: the reference stays out of parameters() and state_dict
        self._frozen: dict[str, nn.Module] = {}
        if self.reference_mode in ("copy", "module"):
            frozen = copy.deepcopy(policy) if self.reference_mode == "copy" else reference
            if disable_dropout:
                _disable_dropout(frozen)
            self._frozen["reference"] = frozen.eval().requires_grad_(False)
        self._reference_hash: Optional[str] = None
        if self.reference_mode == "precomputed":
            self._reference_hash = ref_cache.weights_hash(policy)
        if gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        policy = apply_lora(policy, lora, task_type="CAUSAL_LM")
        if disable_dropout:
            _disable_dropout(policy)
        self.model = policy
        self.reference_forward_calls = 0
        """Number of reference forward passes so far (0 after a precompute cache hit)."""
        self.reference_cache_events: list[tuple[str, str, str]] = []
        """``(split, "hit" | "miss", cache file)`` for each split handled by the precompute."""
        self._attached = False
        self.train_metrics = nn.ModuleDict({_key(name): MeanMetric() for name in _METRICS})
        self.val_metrics = nn.ModuleDict({_key(name): MeanMetric() for name in ("loss",) + _METRICS})

    # -- reference ------------------------------------------------------------------------------------------------
    @property
    def reference_model(self) -> Optional[nn.Module]:
        """The frozen reference model (``"copy"`` or a given module), else None."""
        return self._frozen.get("reference")

    def _reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.reference_forward_calls += 1
        with torch.no_grad():
            reference = self.reference_model
            if reference is not None:
                device = input_ids.device
                if next(reference.parameters()).device != device:
                    reference.to(device)
                return reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            if self.hparams.lora is not None:  # "adapter", or "precomputed" with LoRA: the base model
                with self.model.disable_adapter():
                    return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            # "precomputed" without LoRA: the policy at its starting weights (checked by the caller)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        """Reference completion log-probs of a batch (no gradients)."""
        logits = self._reference_logits(batch["input_ids"], batch["attention_mask"])
        return sequence_logps(logits.detach(), batch["input_ids"], batch["completion_mask"])

    def on_fit_start(self) -> None:
        reference = self.reference_model
        if reference is not None:
            reference.to(self.device)
        if self.reference_mode == "precomputed":
            self.precompute_reference()

    def on_validation_start(self) -> None:
        trainer = attached_trainer(self)
        if self.reference_mode == "precomputed" and not self._attached and trainer is not None \
                and not trainer.training and not trainer.sanity_checking:
            self.precompute_reference()

    def precompute_reference(self, datamodule: Any = None) -> None:
        """Attach reference log-probs to every split of ``datamodule`` (default: the Trainer's), from the cache
        when present, else computed with the starting policy and written to the cache."""
        if datamodule is None:
            trainer = attached_trainer(self)
            datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        missing = [name for name in _PROTOCOL if not callable(getattr(datamodule, name, None))]
        if datamodule is None or missing:
            raise TypeError(
                "reference='precomputed' needs a preference DataModule passed to the Trainer (`datamodule=`) with "
                f"{', '.join(_PROTOCOL)}; got {type(datamodule).__name__} (missing {', '.join(missing)}). Use "
                "lightning_plugins.modules.align.data.PreferenceDataModule or reference='copy'."
            )
        cache_dir = Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else \
            ref_cache.default_cache_dir()
        tokenizer_id = ref_cache.tokenizer_identity(self.tokenizer)
        trainer = attached_trainer(self)
        is_zero = trainer is None or trainer.is_global_zero
        for split in datamodule.splits():
            key = ref_cache.cache_key(datamodule.fingerprint(split), self._reference_hash, tokenizer_id)
            path = cache_dir / f"{key}.safetensors"
            cached = ref_cache.load_reference_logps(path)
            if cached is not None:
                chosen, rejected = cached
                event = "hit"
            else:
                self._check_policy_is_reference(path)
                chosen, rejected = self._compute_split(datamodule.reference_dataloader(split), split)
                if is_zero:
                    ref_cache.save_reference_logps(path, chosen, rejected, {
                        "split": split, "fingerprint": datamodule.fingerprint(split),
                        "reference_hash": self._reference_hash, "tokenizer_id": tokenizer_id})
                event = "miss"
            if is_zero:
                log.info("DPO reference log-probs for split %r: cache %s (%s)", split, event, path)
            self.reference_cache_events.append((split, event, str(path)))
            datamodule.attach_reference_logps(split, chosen, rejected)
        self._attached = True

    def _check_policy_is_reference(self, path: Path) -> None:
        if self.hparams.lora is not None:
            return  # the frozen base weights are the reference at any time
        if ref_cache.weights_hash(self.model) != self._reference_hash:
            raise RuntimeError(
                f"The precomputed reference cache {path} is missing and the policy is no longer at its starting "
                "weights (resumed or already trained), so the reference cannot be recomputed. Restore the cache "
                "folder (`cache_dir`) or restart from the initial policy."
            )

    def _compute_split(self, loader, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        size = len(loader.dataset)
        chosen = torch.full((size,), float("nan"), dtype=torch.float32)
        rejected = torch.full((size,), float("nan"), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                _check_batch(batch)
                ref_chosen, ref_rejected = self.reference_logps(batch).logps.float().chunk(2)
                index = batch["pair_index"].long().cpu()
                chosen[index], rejected[index] = ref_chosen.cpu(), ref_rejected.cpu()
        finally:
            self.model.train(was_training)
        if torch.isnan(chosen).any() or torch.isnan(rejected).any():
            raise RuntimeError(f"reference_dataloader({split!r}) did not cover every row of its dataset "
                               f"({int(torch.isnan(chosen).sum())} of {size} pairs missing).")
        return chosen, rejected

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._reference_hash is not None:
            checkpoint[_CHECKPOINT_KEY] = self._reference_hash

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get(_CHECKPOINT_KEY):
            self._reference_hash = checkpoint[_CHECKPOINT_KEY]

    # -- loss -----------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Policy logits ``(B, T, V)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one preference batch and detached per-pair / per-token values of the logged metrics."""
        _check_batch(batch)
        input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
        logits = self(input_ids, batch["attention_mask"])
        policy = sequence_logps(logits, input_ids, completion_mask)
        policy_chosen, policy_rejected = policy.logps.chunk(2)
        chosen_lengths, rejected_lengths = policy.num_tokens.chunk(2)
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            ref_chosen = batch["ref_chosen_logps"].to(policy_chosen.dtype)
            ref_rejected = batch["ref_rejected_logps"].to(policy_chosen.dtype)
        elif self.reference_mode == "precomputed":
            raise RuntimeError("reference='precomputed' but the batch carries no ref_chosen_logps/ref_rejected_logps: "
                               "fit with the preference DataModule (`datamodule=`), whose batches get them attached.")
        else:
            ref_chosen, ref_rejected = self.reference_logps(batch).logps.chunk(2)

        chosen_mask = policy.mask.chunk(2)[0]
        nll = -policy.per_token.chunk(2)[0].sum() / chosen_mask.sum().clamp(min=1)
        beta, smoothing = self.hparams.beta, self.hparams.label_smoothing
        loss = torch.zeros((), dtype=policy_chosen.dtype, device=policy_chosen.device)
        for loss_type, weight in zip(self.loss_types, self.loss_weights):
            if loss_type == "sft":
                term = nll
            else:
                term = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta,
                                loss_type=loss_type, label_smoothing=smoothing if loss_type in _SMOOTHED else 0.0,
                                chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths).loss
            loss = loss + weight * term
        if self.hparams.nll_coef:
            loss = loss + self.hparams.nll_coef * nll

        with torch.no_grad():
            chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
            rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
            mean_logits = logits[:, :-1].detach().float().mean(dim=-1)
            chosen_logit_mask, rejected_logit_mask = policy.mask.chunk(2)
            chosen_logits, rejected_logits = mean_logits.chunk(2)
            values = {
                "rewards/chosen": chosen_rewards,
                "rewards/rejected": rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "rewards/margins": chosen_rewards - rejected_rewards,
                "logps/chosen": policy_chosen.detach(),
                "logps/rejected": policy_rejected.detach(),
                "logits/chosen": chosen_logits[chosen_logit_mask],
                "logits/rejected": rejected_logits[rejected_logit_mask],
            }
            if self._logs_nll:
                values["nll"] = nll.detach().reshape(1)
        return loss, values

    @property
    def _logs_nll(self) -> bool:
        return bool(self.hparams.nll_coef) or "sft" in self.loss_types

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 over the data-parallel devices, one unit per decoder layer of the
        Hugging Face model and one for the rest (nothing under other strategies)."""
        shard_with_fsdp2(self, self.device_mesh, block_names=hf_block_types(self.model))

    # -- steps ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, values = self.compute_loss(batch)
        pairs = batch["input_ids"].shape[0] // 2
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=pairs)
        for name, value in values.items():
            metric = self.train_metrics[_key(name)]
            metric(value)
            self.log(f"train/{name}", metric, on_step=True, on_epoch=False, batch_size=pairs)
        return loss

    def on_train_end(self) -> None:
        if self.hparams.export_dir is not None and self.trainer.is_global_zero:
            export_pretrained(self.model, self.tokenizer, self.hparams.export_dir)

    def on_train_epoch_end(self) -> None:
        for metric in self.train_metrics.values():
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, values = self.compute_loss(batch)
        pairs = batch["input_ids"].shape[0] // 2
        self.val_metrics[_key("loss")].update(loss.detach(), pairs)
        for name, value in (("loss", None), *values.items()):
            metric = self.val_metrics[_key(name)]
            if value is not None:
                metric.update(value)
            self.log(f"val/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "loss",
                     batch_size=pairs)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.betas, hp.warmup_steps)


def _key(name: str) -> str:
    return name.replace("/", "_")


def _check_losses(loss_type: Any, loss_weights: Any, beta: float, label_smoothing: float,
                  nll_coef: float) -> tuple[list[str], list[float]]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type or [])
    if not types or not all(isinstance(t, str) for t in types):
        raise ValueError(f"loss_type must be a name or a non-empty list of names from {LOSS_TYPES}, got "
                         f"{loss_type!r}.")
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"Unknown DPO loss_type {unknown[0]!r}; allowed: {', '.join(LOSS_TYPES)}.")
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has {len(types)} ({types}); give "
                         "one weight per loss type.")
    if isinstance(nll_coef, bool) or not isinstance(nll_coef, (int, float)) or nll_coef < 0:
        raise ValueError(f"nll_coef must be a number >= 0, got {nll_coef!r}.")
    if label_smoothing and not any(t in _SMOOTHED for t in types):
        hint = " For conservative DPO use loss_type='cdpo'." if "sigmoid" in types else ""
        raise ValueError(f"label_smoothing={label_smoothing} has no effect with loss_type={types}; only "
                         f"{', '.join(_SMOOTHED)} use it. Set label_smoothing=0.0.{hint}")
    one = torch.zeros(1)
    for t in types:  # fail at construction on a bad beta / label_smoothing, with the loss function's own message
        if t != "sft":
            dpo_loss(one, one, one, one, beta=beta, loss_type=t,
                     label_smoothing=label_smoothing if t in _SMOOTHED else 0.0,
                     chosen_lengths=one, rejected_lengths=one)
    return types, weights


def _check_batch(batch: Any) -> None:
    needed = ("input_ids", "attention_mask", "completion_mask")
    if not isinstance(batch, dict) or any(k not in batch for k in needed):
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"A DPO batch must be a dict with {', '.join(needed)} of shape (2B, T), chosen rows first; "
                         f"got {keys}. Use the preference DataModule of lightning_plugins.modules.align.data.")
    if batch["input_ids"].shape[0] % 2:
        raise ValueError(f"A preference batch has 2B rows (chosen then rejected), got {batch['input_ids'].shape[0]}.")
