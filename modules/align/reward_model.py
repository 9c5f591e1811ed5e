"""``RewardModel``: a transformer body plus a scalar head trained with the Bradley-Terry pairwise loss."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

from lightning_plugins.modules.align._common import (
    apply_lora,
    attached_trainer,
    base_model,
    check_optimizer_args,
    configure_adamw,
    disable_dropout as _disable_dropout,
    hparams_to_ignore,
    resolve_causal_lm,
    resolve_encoder,
    resolve_tokenizer,
)
from lightning_plugins.modules.losses import reward_loss
from lightning_plugins.modules.sharding import hf_block_types, shard_with_fsdp2

__all__ = ["RewardModel", "RewardStats"]

BACKBONES = ("causal", "encoder")
POOLINGS = ("last", "cls", "mean")


class RewardStats(Metric):
    """Pairwise accuracy (strict ``r_c > r_r``), mean margin and reward mean/std/min/max over everything seen.

    ``compute()`` returns a dict under TRL's names plus ``std_reward`` (population std over chosen and rejected
    rewards). States reduce by sum/min/max, so the result is exact across batches and DDP ranks.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("pairs", "correct", "margin_sum", "count", "reward_sum", "reward_sq_sum"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("reward_min", torch.tensor(math.inf, dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("reward_max", torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        chosen, rejected = chosen.detach().double(), rejected.detach().double()
        rewards = torch.cat([chosen, rejected])
        self.pairs += chosen.numel()
        self.correct += (chosen > rejected).sum()
        self.margin_sum += (chosen - rejected).sum()
        self.count += rewards.numel()
        self.reward_sum += rewards.sum()
        self.reward_sq_sum += (rewards * rewards).sum()
        self.reward_min = torch.minimum(self.reward_min, rewards.min())
        self.reward_max = torch.maximum(self.reward_max, rewards.max())

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.reward_sum / self.count
        variance = (self.reward_sq_sum / self.count - mean * mean).clamp(min=0.0)
        values = {
            "accuracy": self.correct / self.pairs,
            "margin": self.margin_sum / self.pairs,
            "mean_reward": mean,
            "std_reward": variance.sqrt(),
            "min_reward": self.reward_min,
            "max_reward": self.reward_max,
        }
        return {name: value.float() for name, value in values.items()}


class RewardModel(pl.LightningModule):
    """Scalar reward ``r(x, y)`` = ``Linear(hidden, 1)`` over a pooled transformer state, trained with
    ``-log σ(r_c - r_r - m)`` (+ optional reward centering), TRL ``RewardTrainer``'s loss.

    Batches (contract 4): ``input_ids``/``attention_mask`` of shape ``(2B, T)``, chosen rows first then rejected,
    and ``margin`` ``(B,)`` (used when ``margin=True``). Pooling ``"last"`` reads the hidden state at the last
    position where ``attention_mask == 1`` (the EOS of prompt + response), never by matching the pad id, so it is
    right when pad == eos and for left as well as right padding; causal bodies get position ids from the mask.

    Logged under ``train/`` (per step) and ``val/`` (per epoch, exact over the set): ``loss``, ``accuracy``,
    ``margin``, ``mean_reward``, ``std_reward``, ``min_reward``, ``max_reward``. The validation reward mean and std
    are kept in the ``reward_mean``/``reward_std`` buffers (so in checkpoints) for :meth:`score` with
    ``normalize=True``.

    Args:
        model: a spec (config dict, local folder, ``.gguf``, alias; see ``loading``) or an ``nn.Module``. For
            ``backbone="causal"`` a causal LM whose body (``model.base_model``, e.g. ``LlamaForCausalLM.model``)
            is kept and its LM head dropped; for ``"encoder"`` a BERT-like body from ``load_encoder``.
        tokenizer: tokenizer spec or object (builds config-dict models; used by :meth:`score_texts`).
        backbone: ``"causal"`` or ``"encoder"``.
        pooling: ``"last"`` (last real token; the default for causal bodies), ``"cls"`` (first token) or
            ``"mean"`` (masked mean).
        margin: subtract the batch's per-pair ``margin`` inside the sigmoid.
        center_rewards_coefficient: weight of ``mean((r_c + r_r)²)`` (TRL recommends 0.01); None disables it.
        lr / weight_decay / warmup_steps / betas: AdamW settings (see ``SFTModule``).
        lora: peft ``LoraConfig`` arguments to put adapters on the body (the head is always fully trained).
        disable_dropout: set every dropout probability of the body to 0.
    """

    def __init__(
        self,
        model: Union[str, dict[str, Any], nn.Module],
        tokenizer: Union[str, Any] = "char",
        backbone: str = "causal",
        pooling: str = "last",
        margin: bool = True,
        center_rewards_coefficient: Optional[float] = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        lora: Optional[dict[str, Any]] = None,
        disable_dropout: bool = True,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}.")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if center_rewards_coefficient is not None and not center_rewards_coefficient >= 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0 or None, got {center_rewards_coefficient!r}.")
        check_optimizer_args(lr, weight_decay, warmup_steps, betas)
        self.save_hyperparameters(ignore=hparams_to_ignore(model=model, tokenizer=tokenizer))
        self.tokenizer = resolve_tokenizer(tokenizer)
        if backbone == "causal":
            body = base_model(resolve_causal_lm(model, self.tokenizer, "RewardModel"))
        else:
            body = resolve_encoder(model, self.tokenizer, "RewardModel")
        hidden = _hidden_size(body)
        body = apply_lora(body, lora)
        if disable_dropout:
            _disable_dropout(body)
        self.body = body
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        self.register_buffer("reward_mean", torch.tensor(float("nan")))
        self.register_buffer("reward_std", torch.tensor(float("nan")))
        self.train_stats = RewardStats()
        self.val_stats = RewardStats()
        self.val_loss = MeanMetric()

    # -- model ----------------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``(B, T, H)`` of the body."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.hparams.backbone == "causal":
            # positions count real tokens only, so left- and right-padded rows get identical states
            kwargs["position_ids"] = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        return self.body(**kwargs).last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, H)`` pooled state according to ``pooling``."""
        if self.hparams.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.to(hidden.dtype)
        if self.hparams.pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * (attention_mask != 0)).argmax(dim=1)  # last index with mask 1, any padding side
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rewards ``(B,)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask)
        pooled = self.pool(hidden, attention_mask)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    def score(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              normalize: bool = False) -> torch.Tensor:
        """Rewards ``(B,)`` without gradients; ``normalize=True`` standardizes them with the validation mean/std."""
        with torch.no_grad():
            rewards = self(input_ids, attention_mask)
        if normalize:
            if torch.isnan(self.reward_mean) or torch.isnan(self.reward_std):
                raise RuntimeError("score(normalize=True) needs the validation reward statistics: run validation "
                                   "(or fit with a val split) first, or load a checkpoint saved after validation.")
            rewards = (rewards - self.reward_mean) / self.reward_std.clamp(min=1e-8)
        return rewards

    def score_texts(self, prompts: list[str], responses: list[str], template: Any = "vicuna_v1.1",
                    normalize: bool = False, batch_size: int = 16) -> torch.Tensor:
        """Rewards ``(N,)`` of ``(prompt, response)`` pairs rendered as one user and one assistant turn.

        Args:
            template: a template name or file for ``templates.get_template``, or a ``ChatTemplate``; it must be the
                one the reward model was trained with (its EOS after the answer is where the score is read).
            normalize: standardize with the validation statistics (see :meth:`score`).
            batch_size: pairs scored per forward pass.
        """
        if isinstance(prompts, str) or isinstance(responses, str) or len(prompts) != len(responses):
            raise ValueError("prompts and responses must be lists of strings of the same length, got "
                             f"{type(prompts).__name__} and {type(responses).__name__}.")
        from lightning_plugins.modules.align.templates import get_template

        chat = get_template(template)
        rows = []
        for prompt, response in zip(prompts, responses):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            ids, _ = chat.encode(self.tokenizer, messages)
            rows.append(list(ids))
        device = self.head.weight.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            length = max(len(r) for r in chunk)
            input_ids = torch.full((len(chunk), length), pad, dtype=torch.long, device=device)
            attention_mask = torch.zeros_like(input_ids)
            for i, ids in enumerate(chunk):
                input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
                attention_mask[i, : len(ids)] = 1
            scores.append(self.score(input_ids, attention_mask, normalize=normalize))
        return torch.cat(scores) if scores else torch.empty(0, device=device)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 over the data-parallel devices, one unit per decoder layer of the
        Hugging Face model and one for the rest (nothing under other strategies)."""
        shard_with_fsdp2(self, self.device_mesh, block_names=hf_block_types(self.body))

    # -- steps ----------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, torch.Tensor]):
        """:class:`~lightning_plugins.modules.losses.RewardLossOutput` of one preference batch."""
        if not isinstance(batch, dict) or "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError("A reward-model batch must be a dict with input_ids and attention_mask of shape (2B, T), "
                             "chosen rows first (the preference DataModule's batches).")
        if batch["input_ids"].shape[0] % 2:
            raise ValueError(f"A preference batch has 2B rows (chosen then rejected), got "
                             f"{batch['input_ids'].shape[0]}.")
        rewards = self(batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.float().chunk(2)
        margin = batch.get("margin") if self.hparams.margin else None
        return reward_loss(chosen, rejected, margin=margin,
                           center_rewards_coefficient=self.hparams.center_rewards_coefficient)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        pairs = out.chosen_rewards.shape[0]
        values = self.train_stats(out.chosen_rewards, out.rejected_rewards)
        self.log("train/loss", out.loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=pairs)
        self.log_dict({f"train/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False, batch_size=pairs)
        return out.loss

    def on_train_epoch_end(self) -> None:
        self.train_stats.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.compute_loss(batch)
        pairs = out.chosen_rewards.shape[0]
        self.val_loss.update(out.loss.detach(), pairs)
        self.val_stats.update(out.chosen_rewards, out.rejected_rewards)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=pairs)

    def on_validation_epoch_end(self) -> None:
        if self.val_stats._update_count == 0:
            return
        values = self.val_stats.compute()
        self.val_stats.reset()
        self.log_dict({f"val/{k}": v for k, v in values.items()})
        trainer = attached_trainer(self)
        if trainer is None or not trainer.sanity_checking:
            self.reward_mean.fill_(values["mean_reward"].item())
            self.reward_std.fill_(values["std_reward"].item())

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adamw(self, hp.lr, hp.weight_decay, hp.betas, hp.warmup_steps)


def _hidden_size(body: nn.Module) -> int:
    config = getattr(body, "config", None)
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    raise ValueError(f"cannot find the hidden size of {type(body).__name__}: the body needs a Hugging Face "
                     "`config.hidden_size`.")
