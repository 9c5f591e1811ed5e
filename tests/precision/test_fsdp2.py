"""fp8-msamp under Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes (gloo): O1/O2/O3 train like one
process with the same global batch, ranks agree on every FP8 scale, O3 gathers the weights as 1-byte elements and
keeps masters and Adam states as shards; unsupported combinations are clear errors."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import fsdp_helpers
from fsdp_helpers import ShardedLM, fit_lm, lm_data, run_ranks
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from precision_helpers import TinyMLP, trainer_kwargs
from torch import nn

from lightning_plugins import MSAMPFabricPrecision, MSAMPPrecision
from lightning_plugins.fp8 import FP8Linear, dequantize, get_fp8_grad
from lightning_plugins.fp8.fsdp import local_tensor
from lightning_plugins.commands import run_command
from lightning_plugins.precision import consolidate_sharded_checkpoint
from lightning_plugins.precision.registration import check_strategy

BATCH = 16  # per rank; the single-process reference uses 2 x 16


def _strategy():
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def _scales(plugin):
    return {k: (s.scale.clone(), s.amax_history.clone()) for k, s in plugin.registry.states().items()}


def _fp8_layers(model):
    return [m for m in model.modules() if isinstance(m, FP8Linear)]


def _bytes_per_param(layers, optimizer):
    """Persistent bytes of the converted Linear weights on this rank (weight shard, optimizer state, FP8 gradient
    slot), per parameter of the whole (unsharded) weights."""
    numel = sum(layer.weight.numel() for layer in layers)  # a DTensor's numel is the global one
    total = 0
    for layer in layers:
        local = local_tensor(layer.weight)
        total += local.numel() * local.element_size()
        states = [local_tensor(v) for v in optimizer.state[layer.weight].values() if torch.is_tensor(v)]
        total += sum(v.numel() * v.element_size() for v in states)
        if layer.wgrad_slot is not None:
            total += layer.wgrad_slot.data.untyped_storage().nbytes() + 4
    return total / numel


class GradNorm(pl.Callback):
    """The total gradient norm the plugin's clipping sees at every step (before the clipping itself)."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        plugin = trainer.precision_plugin  # the Fabric-level method returns the norm (the Trainer's returns None)
        self.norms.append(float(MSAMPFabricPrecision.clip_grad_by_norm(plugin, optimizer, 1e9)))


def _train_job(rank, world, level, steps, restore=False):
    warnings.filterwarnings("ignore")
    plugin = MSAMPPrecision(level=level, restore_layers=restore)
    norms = GradNorm()
    gathered_dtypes = set()
    pl.seed_everything(0, verbose=False)  # the same initial weights as the single-process run (fit_lm seeds too)
    model = ShardedLM()

    class SeeWeights(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.hooks = [layer.register_forward_pre_hook(lambda m, args: gathered_dtypes.add(str(m.weight.dtype)))
                          for layer in _fp8_layers(pl_module)]

        def on_train_end(self, trainer, pl_module):
            for hook in self.hooks:
                hook.remove()

    model, trainer = fit_lm(plugin, steps, BATCH, True, _strategy(), callbacks=[norms, SeeWeights()], model=model)
    out = {"losses": model.losses, "optimizer": type(trainer.optimizers[0]).__name__, "norms": norms.norms,
           "skipped": plugin.skipped_steps, "gathered_dtypes": sorted(gathered_dtypes)}
    if restore:  # the layers went back to nn.Linear with fp32, trainable weight shards; FSDP still trains them
        lin = model.model.blocks[0].fc1
        out["restored"] = (type(lin).__name__, str(lin.weight.dtype), lin.weight.requires_grad)
        out["module_types"] = sorted({type(m).__name__ for m in model.modules()})
        (tokens,) = lm_data(4)[:]
        model.model(tokens[:, :-1]).sum().backward()
        grad = lin.weight.grad
        out["grad_after_restore"] = grad is not None and bool(torch.isfinite(grad.full_tensor()).all())
        model.zero_grad()
        # the same model trains again: in FP8 at another level (converted again), then in plain fp32
        fit_lm(MSAMPPrecision(level="O2"), 2, BATCH, True, _strategy(), model=model)
        fit_lm(None, 2, BATCH, True, _strategy(), model=model)
        out["later_losses"] = model.losses[steps:]
        out["later_types"] = sorted({type(m).__name__ for m in model.modules()})
        return out
    layers = _fp8_layers(model)
    out["scales"] = _scales(plugin)
    out["weight_dtypes"] = sorted({str(layer.weight.dtype) for layer in layers})
    out["local_rows"] = [tuple(local_tensor(layer.weight).shape) for layer in layers]
    out["bytes_per_param"] = _bytes_per_param(layers, trainer.optimizers[0])
    states = [trainer.optimizers[0].state[layer.weight] for layer in layers]
    out["state_dtypes"] = sorted({str(s[k].dtype) for s in states for k in ("exp_avg", "exp_avg_sq")})
    stats = plugin.all_gather_stats
    out["all_gather"] = (stats.bytes_sent, stats.elements_sent, sorted(stats.dtypes))
    out["amax_all_reduces"] = stats.amax_all_reduces
    # FSDP's own all-gather output buffers of the FP8 weights (their storage is released between gathers)
    fsdp_params = [plugin._sharding.fsdp_param(layer) for layer in layers]
    out["ag_buffers"] = sorted({(str(t.dtype), t.numel() == world * fp.padded_sharded_param_size.numel())
                                for fp in fsdp_params for t in fp.all_gather_outputs})
    out["shard_numel"] = sum(local_tensor(layer.weight).numel() for layer in layers)
    return out


def _fabric_job(rank, world, level, steps):
    """The Trainer run of ``_train_job`` as a Fabric loop: ModelParallelStrategy with the same sharding (per block,
    then the root) given as ``parallelize_fn``; the plugin converts the sharded layers right after it."""
    import torch.nn.functional as F
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel
    from torch.distributed.fsdp import fully_shard

    warnings.filterwarnings("ignore")

    def parallelize(model, device_mesh):
        for block in model.blocks:
            fully_shard(block, mesh=device_mesh["data_parallel"])
        fully_shard(model, mesh=device_mesh["data_parallel"])
        return model

    plugin = MSAMPFabricPrecision(level=level)
    strategy = FabricModelParallel(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy, plugins=[plugin])
    fabric.launch()
    pl.seed_everything(0, verbose=False)
    model = fabric.setup_module(fsdp_helpers.GPT())
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01))
    losses = []
    for (tokens,) in fsdp_helpers.lm_loader(steps * 2 * BATCH, BATCH, True):
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, fsdp_helpers.VOCAB), tokens[:, 1:].reshape(-1))
        fabric.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
    layers = _fp8_layers(model)
    return {"losses": losses, "fp8_layers": len(layers), "optimizer": type(optimizer.optimizer).__name__,
            "weight_dtypes": sorted({str(layer.weight.dtype) for layer in layers}),
            "sharded": all(type(layer.weight).__name__ == "DTensor" for layer in layers),
            "scales": _scales(plugin), "all_gather_dtypes": sorted(plugin.all_gather_stats.dtypes)}


@pytest.mark.slow
@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_fabric_model_parallel_loop_equals_the_trainer_run(level, tmp_path):
    """Fabric(strategy=ModelParallelStrategy(parallelize_fn), plugins=[MSAMPFabricPrecision(level)]) trains the
    sharded FP8 model exactly as the Trainer does (same losses, bit for bit), with identical scales on the ranks."""
    steps = 6
    (tmp_path / "fabric").mkdir(), (tmp_path / "trainer").mkdir()
    fabric = run_ranks(_fabric_job, tmp_path / "fabric", level=level, steps=steps)
    trainer = run_ranks(_train_job, tmp_path / "trainer", level=level, steps=steps)
    for f, t in zip(fabric, trainer):
        assert f["fp8_layers"] == 8 and f["sharded"]
        assert f["losses"] == t["losses"], (f["losses"], t["losses"])
        assert f["weight_dtypes"] == t["weight_dtypes"] and f["optimizer"] == t["optimizer"]
    assert fabric[0]["optimizer"] == ("AdamW" if level == "O1" else "FP8AdamW")
    assert all(torch.equal(fabric[0]["scales"][k][0], fabric[1]["scales"][k][0]) for k in fabric[0]["scales"])
    if level == "O3":
        assert fabric[0]["all_gather_dtypes"] == ["uint8"]


class GPT2Logits(nn.Module):
    """A tiny Hugging Face GPT-2 (its projections are ``Conv1D``: transposed weights) returning logits; ``blocks``
    are what ``ShardedLM.configure_model`` shards."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=fsdp_helpers.VOCAB, n_positions=fsdp_helpers.CONTEXT, n_embd=32, n_layer=2,
                            n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
        self.hf = GPT2LMHeadModel(config)
        self.blocks = self.hf.transformer.h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(tokens).logits


def _gpt2_lm() -> ShardedLM:
    pl.seed_everything(0, verbose=False)
    module = ShardedLM()
    module.model = GPT2Logits()
    return module


def _gpt2_job(rank, world, level, steps):
    warnings.filterwarnings("ignore")
    plugin = MSAMPPrecision(level=level, restore_layers=False)  # keep the FP8 layers to look at them
    model, trainer = fit_lm(plugin, steps, BATCH, True, _strategy(), model=_gpt2_lm())
    return {"losses": model.losses, "fp8_types": sorted({type(m).__name__ for m in _fp8_layers(model)}),
            "sharded": all(type(m.weight).__name__ == "DTensor" for m in _fp8_layers(model)),
            "all_gather_dtypes": sorted(trainer.precision_plugin.all_gather_stats.dtypes)}


@pytest.mark.slow
def test_fsdp2_o3_trains_gpt2_conv1d_layers_like_one_process(tmp_path):
    """GPT-2's Conv1D projections (weights stored [in, out]) become sharded FP8Conv1D layers at O3, gathered in FP8,
    and train like one process at O2 with the same global batch."""
    steps = 12
    ranks = run_ranks(_gpt2_job, tmp_path, level="O3", steps=steps)
    model, _ = fit_lm(MSAMPPrecision(level="O2"), steps, 2 * BATCH, False, model=_gpt2_lm())
    assert ranks[0]["fp8_types"] == ["FP8Conv1D"] and ranks[0]["sharded"]
    assert ranks[0]["all_gather_dtypes"] == ["uint8"]
    diff = _max_diff(ranks, model)
    print(f"\nGPT-2 (Conv1D) O3 on 2 ranks vs one process O2, {steps} steps: max |loss diff| {diff:.2e}")
    assert diff < 5e-3 and model.losses[-1] < model.losses[0] - 0.1


def _single(level, steps, **kw):
    model, trainer = fit_lm(MSAMPPrecision(level=level), steps, 2 * BATCH, False, callbacks=[GradNorm()], **kw)
    return model, trainer


def _max_diff(ranks, single):
    averaged = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert len(averaged) == len(single.losses)
    return max(abs(a - b) for a, b in zip(averaged, single.losses))


@pytest.mark.slow
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_fsdp2_matches_single_process(level, tmp_path):
    steps = 20
    ranks = run_ranks(_train_job, tmp_path, level=level, steps=steps)
    single, single_trainer = _single(level, steps)
    assert ranks[0]["optimizer"] == ranks[1]["optimizer"] == ("FP8AdamW" if level == "O2" else "AdamW")
    # the weight shards: half of every FP8 layer's rows on each rank; O2 keeps FP16 masters (only as shards)
    assert all(rows[0] in (16, 48, 64) for rows in ranks[0]["local_rows"]), ranks[0]["local_rows"]
    assert ranks[0]["weight_dtypes"] == (["torch.float16"] if level == "O2" else ["torch.float32"])
    if level == "O2":
        assert ranks[0]["state_dtypes"] == ["torch.float16", "torch.float8_e4m3fn"]
    # without O3's extension FSDP gathers the weights in their storage dtype (O2: the FP16 masters, 2 B/element)
    assert ranks[0]["ag_buffers"] == [("torch.float16" if level == "O2" else "torch.float32", True)]
    assert ranks[0]["all_gather"] == (0, 0, [])
    # every rank holds the same scales and amax histories (amaxes reduced before each update)
    a, b = ranks[0]["scales"], ranks[1]["scales"]
    assert a.keys() == b.keys() and len(a) == 32
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    # the gradient norm clipping sees is the global one: the same on both ranks, and that of the full batch
    assert ranks[0]["norms"] == ranks[1]["norms"]
    single_norms = single_trainer.callbacks[0].norms
    assert abs(ranks[0]["norms"][0] - single_norms[0]) < 0.05 * single_norms[0]
    # the loss curve of one process with the same global batch, within FP8 tolerance
    diff = _max_diff(ranks, single)
    print(f"{level}: max |loss diff| vs single process over {steps} steps: {diff:.2e}")
    assert diff < 0.02
    assert single.losses[-1] < 0.8 * single.losses[0]  # it learns


@pytest.mark.slow
def test_fsdp2_o3_fp8_all_gather(tmp_path):
    steps = 50
    ranks = run_ranks(_train_job, tmp_path, level="O3", steps=steps)
    single, _ = _single("O2", steps)
    rel = abs(ranks[0]["losses"][-1] + ranks[1]["losses"][-1] - 2 * single.losses[-1]) / (2 * single.losses[-1])
    print(f"O3: final loss {sum(r['losses'][-1] for r in ranks) / 2:.4f} vs single-process O2 "
          f"{single.losses[-1]:.4f} ({rel:.2%}); max |diff| {_max_diff(ranks, single):.2e}; "
          f"bytes/param per rank {ranks[0]['bytes_per_param']:.3f}; all-gather {ranks[0]['all_gather']}; "
          f"amax all-reduces of their own: {ranks[0]['amax_all_reduces']} in "
          f"{8 * ranks[0]['all_gather'][1] // ranks[0]['shard_numel']} gathers")
    assert rel < 0.01
    for r in ranks:
        # the forward saw E4M3 weights, gathered as uint8: 1 byte per element, the rank's shard in each gather
        assert r["gathered_dtypes"] == ["torch.float8_e4m3fn"]
        sent, elements, dtypes = r["all_gather"]
        assert dtypes == ["uint8"] and sent == elements
        assert r["ag_buffers"] == [("torch.uint8", True)]  # FSDP gathered world x shard bytes, nothing wider
        assert elements % r["shard_numel"] == 0 and elements // r["shard_numel"] >= steps
        # the weight amaxes are agreed once per step, in the scaling update's collective: only the first step's
        # gathers (forward + backward re-gather of 8 layers) ran their own scalar all-reduce
        gathers = 8 * elements // r["shard_numel"]
        assert r["amax_all_reduces"] <= 16 < gathers, (r["amax_all_reduces"], gathers)
        # FP16 master and E4M3/FP16 Adam moments as shards only: (2 + 1 + 2) / 2 ranks = 2.5 B/param (+ 4 B scales
        # per tensor); the FP8 gradient slot is released between steps
        assert 2.5 <= r["bytes_per_param"] < 2.55
        assert r["weight_dtypes"] == ["torch.float16"]
    a, b = ranks[0]["scales"], ranks[1]["scales"]
    assert all(torch.equal(a[k][0], b[k][0]) for k in a)


class PoisonableLM(ShardedLM):
    poison = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.poison else loss


def _skip_job(rank, world):
    warnings.filterwarnings("ignore")
    plugin = MSAMPPrecision(level="O2", restore_layers=False)
    pl.seed_everything(0, verbose=False)
    model = PoisonableLM()

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.poison = batch_idx == 2 and trainer.global_rank == 1

        def on_after_backward(self, trainer, pl_module):
            # step 3: only rank 1's FP8 casts saw an inf (a rank-local flag, nothing else shows it)
            if trainer.global_step == 3 and trainer.global_rank == 1:
                next(iter(plugin.registry.states().values())).nonfinite_count.add_(1)

    model, trainer = fit_lm(plugin, 6, BATCH, True, _strategy(), callbacks=[Poison()], model=model,
                            gradient_clip_val=0.5)
    steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    return {"skipped": plugin.skipped_steps, "scales": _scales(plugin), "losses": model.losses, "steps": steps,
            "finite": all(bool(torch.isfinite(local_tensor(p)).all()) for p in model.parameters())}


@pytest.mark.slow
def test_fsdp2_inf_on_one_rank_skips_on_all(tmp_path):
    ranks = run_ranks(_skip_job, tmp_path)
    assert [r["skipped"] for r in ranks] == [2, 2]
    assert [r["steps"] for r in ranks] == [{4.0}, {4.0}]  # 6 steps, the same 2 skipped on both ranks
    assert all(r["finite"] for r in ranks)
    a, b = ranks[0]["scales"], ranks[1]["scales"]
    assert all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    assert all(torch.isfinite(torch.tensor(r["losses"][3:])).all() for r in ranks)


@pytest.mark.slow
def test_fsdp2_restores_plain_layers(tmp_path):
    ranks = run_ranks(_train_job, tmp_path, level="O3", steps=2, restore=True)
    for r in ranks:
        assert r["restored"] == ("Linear", "torch.float32", True)
        assert "FP8Linear" not in r["module_types"] and "WeightGradSlot" not in r["module_types"]
        assert r["grad_after_restore"]
        assert len(r["later_losses"]) == 4 and all(0 < x < 4.5 for x in r["later_losses"])
        assert r["later_types"] == r["module_types"]


# ---------------------------------------------------------------------------------------------- in-place conversion


def test_in_place_conversion_keeps_the_layer_objects_and_reverts():
    from lightning_plugins.fp8 import convert_to_fp8, revert_fp8

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    layers, params = list(model), [p for p in model.parameters()]
    x = torch.randn(8, 32)
    report = convert_to_fp8(model, exclude=None, in_place=True, wgrad_mode="fp8", log_table=False)
    assert len(report.converted) == 2
    assert list(model) == layers and [p for p in model.parameters()] == params  # the same objects
    assert isinstance(model[0], FP8Linear) and model[0].wgrad_slot is not None
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    reference = FP8Linear.from_linear(nn.Linear(32, 64), wgrad_mode="fp8")  # the same layer built the usual way
    reference.weight, reference.bias = model[0].weight, model[0].bias
    assert torch.equal(model[0](x), reference(x))
    model(x).sum().backward()
    assert get_fp8_grad(model[0].weight) is not None
    assert revert_fp8(model) == 2
    assert list(model) == layers and all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert [p for p in model.parameters()] == params and [n for n, _ in model.named_modules()] == ["", "0", "1", "2"]
    assert not hasattr(model[0], "input_scaling") and get_fp8_grad(model[0].weight) is None
    assert model[0].extra_repr() == "in_features=32, out_features=64, bias=True"


# ---------------------------------------------------------------------------------------------- errors


def test_precision_string_is_accepted_by_model_parallel_strategy():
    trainer = pl.Trainer(**trainer_kwargs(devices=2, strategy=_strategy()), precision="fp8-msamp")
    assert isinstance(trainer.precision_plugin, MSAMPPrecision) and trainer.precision_plugin.level == "O2"
    trainer = pl.Trainer(**trainer_kwargs(devices=2, strategy=_strategy()), plugins=[MSAMPPrecision(level="O3")])
    assert trainer.precision_plugin.level == "O3"


def test_o3_without_sharding_strategy_is_an_error():
    with pytest.raises(ValueError, match=r"level='O3'.*needs ModelParallelStrategy.*SingleDeviceStrategy"):
        pl.Trainer(**trainer_kwargs(), plugins=[MSAMPPrecision(level="O3")])
    with pytest.raises(ValueError, match=r"level='O3'.*needs ModelParallelStrategy.*DDPStrategy"):
        pl.Trainer(**trainer_kwargs(devices=2, strategy="ddp_spawn"), plugins=[MSAMPPrecision(level="O3")])
    # Fabric / direct use: an unsharded model at O3 is refused when it is converted
    with pytest.raises(ValueError, match=r"level='O3'.*FSDP2.*level='O2'"):
        MSAMPPrecision(level="O3").convert_module(nn.Sequential(nn.Linear(32, 32)))


def test_fsdp1_strategy_is_an_error():
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy.*Supported: a single device.*ModelParallel"):
        pl.Trainer(**trainer_kwargs(devices=2, strategy="fsdp"), precision="fp8-msamp")


def test_deepspeed_is_an_error():
    with pytest.raises(ValueError, match=r"does not support DeepSpeedStrategy \(strategy='deepspeed_stage_2'\).*"
                                         r"Supported: a single device"):
        pl.Trainer(**trainer_kwargs(strategy="deepspeed_stage_2"), plugins=[MSAMPPrecision(level="O1")])
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed is not installed: skip its __init__
    with pytest.raises(ValueError, match=r"does not support DeepSpeedStrategy.*Supported: a single device"):
        check_strategy(strategy, MSAMPPrecision())


def test_tensor_parallel_is_an_error():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=1\), got tensor_parallel_size=2"):
        pl.Trainer(**trainer_kwargs(devices=2, strategy=ModelParallelStrategy(1, 2)), precision="fp8-msamp")


@pytest.mark.parametrize("level", ["O2", "O3"])
def test_non_adam_optimizer_is_an_error(level):
    model = TinyMLP()
    with pytest.raises(TypeError, match=rf"level='{level}'.*needs torch.optim.Adam or torch.optim.AdamW, got "
                                        r"torch.optim.sgd.SGD.*level='O1'"):
        MSAMPPrecision(level=level).convert_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)


def _sgd_job(rank, world):
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    model = ShardedLM(optimizer="sgd")
    try:
        fit_lm(MSAMPPrecision(level="O3"), 1, BATCH, True, _strategy(), model=model)
    except TypeError as err:
        return {"message": str(err)}
    return {"message": ""}


@pytest.mark.slow
def test_non_adam_optimizer_with_sharded_o3_is_an_error(tmp_path):
    ranks = run_ranks(_sgd_job, tmp_path)
    assert "needs torch.optim.Adam or torch.optim.AdamW, got torch.optim.sgd.SGD" in ranks[0]["message"]


# ---------------------------------------------------------------------------------------------- checkpoints


def _ckpt_job(rank, world, level, ckpt):
    warnings.filterwarnings("ignore")
    from lightning_plugins.fp8.fsdp import is_sharded

    def trainer(epochs, callbacks=()):
        plugin = MSAMPPrecision(level=level, restore_layers=False)
        kw = trainer_kwargs(max_epochs=epochs, limit_val_batches=0, deterministic=False, callbacks=list(callbacks),
                            use_distributed_sampler=False, devices=2, strategy=_strategy())
        return pl.Trainer(plugins=[plugin], **kw), plugin

    def model():
        pl.seed_everything(0, verbose=False)
        return ShardedLM()

    class SaveAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                trainer.save_checkpoint(ckpt)
                self.saved = snapshot(pl_module, trainer, trainer.precision_plugin)

    def snapshot(m, t, plugin):
        opt = t.optimizers[0]
        states = {n: {k: local_tensor(v).clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                  for n, p in m.named_parameters()}
        return {"params": {n: local_tensor(p).detach().clone() for n, p in m.named_parameters()},
                "states": states, "scales": _scales(plugin), "optimizer": type(opt).__name__,
                "sharded": is_sharded(m)}

    loader = fsdp_helpers.lm_loader(3 * 2 * BATCH, BATCH, True)  # 3 steps per epoch
    saver = SaveAfterFirstEpoch()
    full, t_full, plugin = model(), *trainer(2, [saver])
    t_full.fit(full, loader)
    out = {"full_losses": full.losses, "full": snapshot(full, t_full, plugin), "saved": saver.saved}
    resumed, (t_res, plugin) = model(), trainer(2)
    t_res.fit(resumed, loader, ckpt_path=ckpt)
    out.update(resumed_losses=resumed.losses, resumed=snapshot(resumed, t_res, plugin))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("level", ["O2", "O3"])
def test_fsdp2_sharded_checkpoint_resumes_bit_exact(level, tmp_path):
    ranks = run_ranks(_ckpt_job, tmp_path, level=level, ckpt=str(tmp_path / "ckpt"))
    for r in ranks:
        assert r["full"]["sharded"] and r["full"]["optimizer"] == r["resumed"]["optimizer"] == "FP8AdamW"
        assert len(r["full_losses"]) == 6 and r["resumed_losses"] == r["full_losses"][3:]
        a, b = r["full"], r["resumed"]
        assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        assert a["states"].keys() == b["states"].keys()
        for n, state in a["states"].items():
            for k, v in state.items():
                assert torch.equal(v, b["states"][n][k]) if torch.is_tensor(v) else v == b["states"][n][k], (n, k)
        assert all(torch.equal(a["scales"][k][0], b["scales"][k][0]) and torch.equal(a["scales"][k][1],
                                                                                    b["scales"][k][1])
                   for k in a["scales"])
    # the FP8 moments of the FP8 weights are E4M3 shards with one scale for the whole tensor on every rank
    name = "model.blocks.0.fc1.weight"
    s0, s1 = ranks[0]["full"]["states"][name], ranks[1]["full"]["states"][name]
    assert s0["exp_avg"].dtype == torch.float8_e4m3fn and s0["exp_avg"].shape == (64, 32)
    assert torch.equal(s0["exp_avg_scale_inv"], s1["exp_avg_scale_inv"])


def _consolidated_resume(path, plugin):
    """One process, the same global batch: the epoch after the save, resumed from the consolidated file."""
    pl.seed_everything(0, verbose=False)
    model = ShardedLM()
    kw = trainer_kwargs(max_epochs=2, limit_val_batches=0, deterministic=False)
    trainer = pl.Trainer(plugins=[plugin] if plugin is not None else None, **kw)
    trainer.fit(model, fsdp_helpers.lm_loader(3 * 2 * BATCH, 2 * BATCH, False), ckpt_path=path)
    return model, trainer


@pytest.mark.slow
@pytest.mark.parametrize("level", ["O2", "O3"])
def test_consolidated_sharded_checkpoint_loads_into_plain_models_and_resumes(level, tmp_path):
    """consolidate_sharded_checkpoint: the sharded folder -> one portable file with the gathered masters in fp32
    (exactly), torch AdamW moments (the dequantized FP8 shards, exactly), loadable by a plain nn.Linear GPT with
    strict=True; one-process 32-true and fp8-msamp runs resume from it and see the sharded run's loss."""
    ranks = run_ranks(_ckpt_job, tmp_path, level=level, ckpt=str(tmp_path / "ckpt"))
    saved = [r["saved"] for r in ranks]
    consolidate_sharded_checkpoint(tmp_path / "ckpt", tmp_path / "out" / "portable.ckpt")
    portable = torch.load(tmp_path / "out" / "portable.ckpt", weights_only=True)
    summary = run_command("consolidate-checkpoint", ["--checkpoint_dir", str(tmp_path / "ckpt"),
                                                     "--output_file", str(tmp_path / "cli.ckpt")])
    assert summary["tensors"] == 30 and summary["optimizer_states"] == 1 and summary["global_step"] == 3
    from_cli = torch.load(tmp_path / "cli.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(from_cli[k], v) for k, v in portable["state_dict"].items())
    assert portable["MSAMPPrecision"]["checkpoint_format"] == "portable"
    assert portable["MSAMPPrecision"]["level"] == level and portable["global_step"] == 3

    def gathered(name, key=None):  # FSDP2 shards dim 0: the ranks' local shards in order are the full tensor
        parts = [s["params"][name] if key is None else s["states"][name][key] for s in saved]
        return torch.cat(parts) if parts[0].dim() else parts[0]

    plain = fsdp_helpers.GPT()  # nn.Linear layers, fp32
    result = plain.load_state_dict({k.removeprefix("model."): v for k, v in portable["state_dict"].items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, param in plain.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, gathered("model." + name).float()), name
    adamw = torch.optim.AdamW(plain.parameters(), lr=3e-3, weight_decay=0.01)
    adamw.load_state_dict(portable["optimizer_states"][0])
    fp8_moments = 0
    for name, param in plain.named_parameters():
        state, fsdp_state = adamw.state[param], saved[0]["states"]["model." + name]
        assert state["exp_avg"].dtype == torch.float32 and float(state["step"]) == 3
        if "exp_avg_scale_inv" in fsdp_state:  # an FP8 moment: dequantized with the tensor's one scale
            fp8_moments += 1
            expected = dequantize(gathered("model." + name, "exp_avg"), fsdp_state["exp_avg_scale_inv"])
        else:
            expected = gathered("model." + name, "exp_avg")
        assert torch.equal(state["exp_avg"], expected), name
    assert fp8_moments == 30  # FP8AdamW keeps every parameter's first moment in E4M3
    sharded_loss = (ranks[0]["full_losses"][3] + ranks[1]["full_losses"][3]) / 2  # first step after the save
    for plugin in (None, MSAMPPrecision(level="O2")):
        model, trainer = _consolidated_resume(tmp_path / "out" / "portable.ckpt", plugin)
        assert trainer.global_step == 6 and len(model.losses) == 3
        print(f"\n{level} consolidated -> {type(trainer.precision_plugin).__name__}: first loss after resume "
              f"{model.losses[0]:.5f}, sharded run {sharded_loss:.5f}")
        # FP8 again: the same scales and weights (measured equal to 5 digits); 32-true: no FP8 casts (3e-4 relative)
        tolerance = 1e-3 if plugin is not None else 1e-2
        assert abs(model.losses[0] - sharded_loss) < tolerance * sharded_loss, (plugin, model.losses[0], sharded_loss)


def test_consolidating_something_else_is_an_error(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for path, found in ((tmp_path / "model.ckpt", "is a file"), (tmp_path / "empty", "without a distributed"),
                        (tmp_path / "missing", "is nothing")):
        with pytest.raises(ValueError, match=found) as err:
            consolidate_sharded_checkpoint(path)
        assert str(path) in str(err.value) and "to_portable_checkpoint" in str(err.value)


def _sharded_errors_job(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    from fsdp_helpers import GPT

    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    messages = {}

    def sharded():
        torch.manual_seed(0)
        model = GPT()
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    for name, kwargs in {"portable": {"checkpoint_format": "portable"},
                         "fp16_scaled": {"master_weights": "fp16_scaled"}}.items():
        try:
            MSAMPPrecision(**kwargs).convert_module(sharded())
        except ValueError as err:
            messages[name] = str(err)
    model = sharded()
    model.pos = nn.Parameter(distribute_tensor(torch.zeros(16, 32), mesh, [Replicate()]))  # tensor-parallel style
    try:
        MSAMPPrecision(level="O1").convert_module(model)
    except ValueError as err:
        messages["placement"] = str(err)
    partial = GPT()
    fully_shard(partial.blocks[0], mesh=mesh)  # the root is not sharded
    try:
        MSAMPPrecision(level="O1").convert_module(partial)
    except ValueError as err:
        messages["partial"] = str(err)
    return messages


@pytest.mark.slow
def test_unsupported_sharded_layouts_are_errors(tmp_path):
    messages = run_ranks(_sharded_errors_job, tmp_path)[0]
    assert "checkpoint_format='portable'" in messages["portable"] and "allowed there: 'native'" in messages["portable"]
    assert "master_weights='fp16_scaled'" in messages["fp16_scaled"] and "'fp16'" in messages["fp16_scaled"]
    assert "'pos' is placed as (Replicate(),)" in messages["placement"]
    assert "tensor_parallel_size=1" in messages["placement"]
    assert "not sharded: apply fully_shard to the root module as well" in messages["partial"]


def _accumulate_job(rank, world, grad_comm):
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    model, _ = fit_lm(MSAMPPrecision(level="O3", grad_comm=grad_comm), 8, BATCH // 2, True, _strategy(),
                      model=ShardedLM(), val_batches=2, accumulate_grad_batches=2)
    return {"losses": model.losses, "val_losses": model.val_losses}


@pytest.mark.slow
@pytest.mark.parametrize("grad_comm", ["fp8", "hp"])
def test_fsdp2_o3_gradient_accumulation_and_validation(grad_comm, tmp_path):
    """Micro-batches accumulate in the FP8 gradient slot before the one reduce-scatter of the step (E4M3 bytes, or
    fp32 with grad_comm="hp"); validation gathers FP8 weights without recording amaxes."""
    ranks = run_ranks(_accumulate_job, tmp_path, grad_comm=grad_comm)
    single, _ = fit_lm(MSAMPPrecision(level="O2"), 8, BATCH, False, val_batches=2, accumulate_grad_batches=2)
    assert len(ranks[0]["losses"]) == len(single.losses) == 16
    assert _max_diff(ranks, single) < 0.02
    val = [(a + b) / 2 for a, b in zip(ranks[0]["val_losses"], ranks[1]["val_losses"])]
    assert len(val) == 2 and max(abs(a - b) for a, b in zip(val, single.val_losses)) < 0.02
