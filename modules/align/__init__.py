"""Xwin-LM alignment stages as LightningModules (installed as ``lightning_plugins.modules.align``).

- Models and text: :func:`load_tokenizer`, :func:`load_causal_lm`, :func:`load_encoder` (local folders, GGUF files,
  config dicts, the offline SmolLM2 / MiniLM aliases), chat templates (:func:`get_template`).
- Data: :class:`SFTDataModule`, :class:`PreferenceDataModule` (jsonl, truncation and drops counted).
- Stages: :class:`SFTModule`, :class:`RewardModel`, :class:`DPOModule`; rejection sampling
  (:func:`run_rejection_sampling`, :func:`best_of_k_curve`) and DPO pair building (:func:`build_pairs`).
- A verifiable task for the whole pipeline: :class:`ArithmeticTask`, :class:`ArithmeticVerifier`.
"""

from lightning_plugins.modules.align.arithmetic import ArithmeticTask, ArithmeticVerifier
from lightning_plugins.modules.align.best_of_k import best_of_k_curve, plot_best_of_k
from lightning_plugins.modules.align.data import (
    PreferenceDataModule,
    PreferenceDataset,
    SFTDataModule,
    SFTDataset,
    read_jsonl,
)
from lightning_plugins.modules.align.dpo import DPOModule
from lightning_plugins.modules.align.generation import SamplingStats, sample_responses
from lightning_plugins.modules.align.loading import load_causal_lm, load_encoder, load_tokenizer
from lightning_plugins.modules.align.multi_response import read_multi_response_jsonl, write_jsonl
from lightning_plugins.modules.align.pairs import PAIR_STRATEGIES, PairStats, build_pairs, run_build_pairs
from lightning_plugins.modules.align.reward_model import RewardModel, RewardStats
from lightning_plugins.modules.align.sampling import rejection_sample, run_rejection_sampling
from lightning_plugins.modules.align.sft import SFTModule
from lightning_plugins.modules.align.templates import ChatTemplate, get_template

__all__ = [
    "PAIR_STRATEGIES",
    "ArithmeticTask",
    "ArithmeticVerifier",
    "ChatTemplate",
    "DPOModule",
    "PairStats",
    "PreferenceDataModule",
    "PreferenceDataset",
    "RewardModel",
    "RewardStats",
    "SFTDataModule",
    "SFTDataset",
    "SFTModule",
    "SamplingStats",
    "best_of_k_curve",
    "build_pairs",
    "get_template",
    "load_causal_lm",
    "load_encoder",
    "load_tokenizer",
    "plot_best_of_k",
    "read_jsonl",
    "read_multi_response_jsonl",
    "rejection_sample",
    "run_build_pairs",
    "run_rejection_sampling",
    "sample_responses",
    "write_jsonl",
]
