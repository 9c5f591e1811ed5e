"""``SFTModule``: supervised fine-tuning of a causal LM with exact global token normalization."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

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
from lightning_plugins.modules.losses import sequence_logps
from lightning_plugins.modules.sharding import hf_block_types, shard_with_fsdp2

__all__ = ["SFTModule"]

IGNORE_INDEX = -100


class SFTModule(pl.LightningModule):
    """Token-level NLL on the trained spans of a chat (``labels != -100``), normalized by the *global* number of
    target tokens of the gradient-accumulation window across all ranks.

    Batches (contract 3): right-padded ``input_ids``, ``attention_mask``, ``labels`` (input ids with -100 on every
    token that is not trained on, unshifted) and ``window_tokens``, the number of target tokens of the whole
    accumulation window on this rank. The micro-batch loss is
    ``token_nll_sum * accumulate_grad_batches * world_size / all_reduce_sum(window_tokens)``, so after Lightning's
    division by ``accumulate_grad_batches`` and DDP's gradient average, the gradient is the one of the token mean
    over every target token of the optimizer step. Without ``window_tokens`` the micro-batch token mean is used.

    Logged: ``train/loss`` (micro-batch token mean per step), ``val/loss`` (token mean over the validation set),
    ``val/token_accuracy`` (argmax next-token accuracy on target tokens), ``train/num_tokens`` and
    ``val/num_tokens`` (target tokens per epoch, all ranks).

    Args:
        model: causal LM spec (a config dict, a local folder, a ``.gguf`` file or an alias, see ``loading``) or an
            ``nn.Module`` (Python API).
        tokenizer: tokenizer spec (``"char"``, a folder, a ``.gguf`` file, an alias) or a tokenizer object; used to
            build a model from a config dict and by :meth:`generate`.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (not on biases and norm weights).
        warmup_steps: linear LR warm-up over this many optimizer steps (0: constant LR).
        betas: AdamW betas.
        lora: peft ``LoraConfig`` arguments to train LoRA adapters only, e.g.
            ``{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}``; None trains all weights.
        gradient_checkpointing: non-reentrant activation checkpointing of the transformer blocks.
        disable_dropout: set every dropout probability of the model to 0 (TRL's default).
        export_dir: when set, the trained model (LoRA merged) and tokenizer are written there as a Hugging Face
            folder at the end of ``fit``: the ``model:`` of the next stage (reward model, rejection sampling, DPO).
    """

    def __init__(
        self,
        model: Union[str, dict[str, Any], nn.Module],
        tokenizer: Union[str, Any] = "char",
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        lora: Optional[dict[str, Any]] = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        export_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_optimizer_args(lr, weight_decay, warmup_steps, betas)
        self.save_hyperparameters(ignore=hparams_to_ignore(model=model, tokenizer=tokenizer))
        self.tokenizer = resolve_tokenizer(tokenizer)
        lm = resolve_causal_lm(model, self.tokenizer, "SFTModule")
        if gradient_checkpointing:
            enable_gradient_checkpointing(lm)
        lm = apply_lora(lm, lora, task_type="CAUSAL_LM")
        if disable_dropout:
            _disable_dropout(lm)
        self.model = lm
        vocab = _vocab_size(lm, self.tokenizer)
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.train_tokens = SumMetric()
        self.val_tokens = SumMetric()
        self.val_token_accuracy = MulticlassAccuracy(vocab, average="micro", ignore_index=IGNORE_INDEX,
                                                     validate_args=False)
        self._warned_window = False

    # -- model ----------------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``(B, T, V)`` of the causal LM."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def compute_loss(self, batch: dict[str, torch.Tensor], accumulate_grad_batches: int = 1, world_size: int = 1,
                     reduce_sum=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch as the training step returns it (see the class docstring) and its statistics.

        Args:
            batch: an SFT batch (contract 3).
            accumulate_grad_batches / world_size: the Trainer's; the loss is scaled by their product.
            reduce_sum: sums a tensor over all ranks (the strategy's all-reduce); identity when None.

        Returns:
            ``(loss, stats)`` with ``stats`` holding ``nll_sum``, ``num_tokens`` (this micro-batch's target tokens),
            ``token_mean`` (detached micro-batch token-mean NLL) and ``logits``.
        """
        labels = _check_batch(batch)
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        out = sequence_logps(logits, labels, ignore_index=IGNORE_INDEX)
        nll_sum = -out.logps.sum()
        num_tokens = out.num_tokens.sum()
        window = batch.get("window_tokens")
        if window is None:
            if (accumulate_grad_batches > 1 or world_size > 1) and not self._warned_window:
                rank_zero_warn("SFT batches carry no `window_tokens`: the loss is the micro-batch token mean, which "
                               "is not the exact global token mean under gradient accumulation or DDP.")
                self._warned_window = True
            loss = nll_sum / num_tokens.clamp(min=1)
        else:
            window = torch.as_tensor(window, device=nll_sum.device, dtype=nll_sum.dtype).reshape(())
            total = reduce_sum(window) if reduce_sum is not None else window
            loss = nll_sum * (accumulate_grad_batches * world_size) / total.clamp(min=1)
        stats = {"nll_sum": nll_sum.detach(), "num_tokens": num_tokens,
                 "token_mean": (nll_sum / num_tokens.clamp(min=1)).detach(), "logits": logits}
        return loss, stats

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 over the data-parallel devices, one unit per decoder layer of the
        Hugging Face model and one for the rest (nothing under other strategies)."""
        shard_with_fsdp2(self, self.device_mesh, block_names=hf_block_types(self.model))

    # -- steps ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        trainer = attached_trainer(self)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        world = int(getattr(trainer, "world_size", 1) or 1)
        reduce_sum = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer is not None else None
        loss, stats = self.compute_loss(batch, accumulate, world, reduce_sum)
        batch_size = batch["input_ids"].shape[0]
        self.train_loss(stats["token_mean"], stats["num_tokens"])
        self.train_tokens(stats["num_tokens"])
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/num_tokens", self.train_tokens, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, stats = self.compute_loss(batch)
        labels = batch["labels"]
        predictions = stats["logits"][:, :-1].argmax(dim=-1)
        batch_size = labels.shape[0]
        self.val_loss.update(stats["token_mean"], stats["num_tokens"])
        self.val_tokens.update(stats["num_tokens"])
        self.val_token_accuracy.update(predictions.reshape(-1), labels[:, 1:].reshape(-1))
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("val/token_accuracy", self.val_token_accuracy, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("val/num_tokens", self.val_tokens, on_step=False, on_epoch=True, batch_size=batch_size)

    def on_train_end(self) -> None:
        if self.hparams.export_dir is not None and self.trainer.is_global_zero:
            export_pretrained(self.model, self.tokenizer, self.hparams.export_dir)

    def on_train_epoch_end(self) -> None:
        self.train_loss.reset()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.betas, hp.warmup_steps)

    # -- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], template: Any = None, **gen_kwargs: Any) -> list[str]:
        """Complete each prompt with ``model.generate`` (left-padded batch) and return the decoded new text.

        Args:
            prompts: raw prompt strings.
            template: None tokenizes each prompt as is; a template name or ``ChatTemplate`` renders it as one user
                turn with the generation prompt (``templates.get_template(...).prompt_ids``).
            gen_kwargs: passed to ``generate`` (default ``max_new_tokens=32``, greedy).
        """
        return generate_texts(self.model, self.tokenizer, prompts, template, **gen_kwargs)


def generate_texts(model: nn.Module, tokenizer: Any, prompts: list[str], template: Any = None,
                   **gen_kwargs: Any) -> list[str]:
    """``model.generate`` on a left-padded batch of prompts; returns the decoded new tokens without specials."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings.")
    if template is None:
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    else:
        from lightning_plugins.modules.align.templates import get_template

        chat = get_template(template)
        encoded = [list(chat.prompt_ids(tokenizer, p)) for p in prompts]
    device = next(model.parameters()).device
    length = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        if ids:
            input_ids[row, length - len(ids):] = torch.tensor(ids, device=device)
            attention_mask[row, length - len(ids):] = 1
    gen_kwargs.setdefault("max_new_tokens", 32)
    gen_kwargs.setdefault("do_sample", False)
    gen_kwargs.setdefault("pad_token_id", pad)
    gen_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    finally:
        model.train(was_training)
    return tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)


def _check_batch(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"An SFT batch must be a dict with input_ids, attention_mask, labels (and window_tokens); "
                         f"got {keys}. Use the SFT DataModule of lightning_plugins.modules.align.data.")
    return batch["labels"]


def _vocab_size(model: nn.Module, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if isinstance(size, int):
        return size
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is not None:
        return int(embeddings.weight.shape[0])
    return len(tokenizer)
