"""GSLoRA task objectives: selection, the classification objective against the old formula, the detection
objective (bounded and background) on a tiny real detector, detection forgetting data, AP split metrics, and
end-to-end detection forgetting through ``Trainer``."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F

from lightning_plugins.callbacks import (
    ClassificationObjective,
    DetectionForgettingDataModule,
    DetectionObjective,
    GSLoRA,
    TaskObjective,
)
from lightning_plugins.callbacks.gslora.detection_data import detection_collate, filter_target, image_labels
from lightning_plugins.callbacks.gslora.evaluation import evaluate_split_metrics
from lightning_plugins.callbacks.gslora.lora import find_lora
from lightning_plugins.callbacks.gslora.metrics import drop_and_h
from lightning_plugins.callbacks.gslora.objectives import (
    StepContext, reported_share, resolve_objective, split_average_precision,
)
from lightning_plugins.callbacks.gslora.tasks import view

from _tiny_detector import SquaresDataModule, SquaresDataset, TinyDetector  # noqa: E402  (tests/callbacks)


# ------------------------------------------------------------------------------------------------------ fixtures
class TinyClassifier(pl.LightningModule):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].mlp = nn.Module()
        self.blocks[0].mlp.fc1 = nn.Linear(6, 8)
        self.blocks[0].mlp.fc2 = nn.Linear(8, 6)
        self.head = nn.Linear(6, num_classes)

    def embed(self, x):
        return x + self.blocks[0].mlp.fc2(F.gelu(self.blocks[0].mlp.fc1(x)))

    def forward(self, x):
        return self.head(self.embed(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


@pytest.fixture(scope="session")
def pretrained_detector(tmp_path_factory):
    """``make()``: a fresh TinyDetector with the session's weights, trained on the squares data (AP ~40 %)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = TinyDetector()
    root = str(tmp_path_factory.mktemp("pretrain_det"))
    pl.Trainer(max_epochs=120, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               default_root_dir=root).fit(model, SquaresDataModule())
    torch.set_num_threads(threads)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def make():
        fresh = TinyDetector()
        fresh.load_state_dict(state)
        return fresh

    return make


def _context(task_view, groups, beta=0.3, alpha=0.01):
    return StepContext(task_view, beta=beta, alpha=alpha, alpha_now=alpha, groups=groups)


def _group_lasso(groups):
    return sum(math.sqrt(sum(float(w.pow(2).sum()) for w in g)) for g in groups)


# ------------------------------------------------------------------------------------------------------ selection
def test_auto_picks_detection_for_modules_with_forgetting_losses():
    assert isinstance(resolve_objective("auto", TinyDetector()), DetectionObjective)
    assert isinstance(resolve_objective("auto", TinyClassifier()), ClassificationObjective)
    assert isinstance(resolve_objective("detection", TinyClassifier()), DetectionObjective)
    assert isinstance(resolve_objective("classification", TinyDetector()), ClassificationObjective)
    mine = DetectionObjective(bound=3.0, mode="background")
    assert resolve_objective(mine, TinyClassifier()) is mine
    with pytest.raises(ValueError, match="objective must be one of"):
        GSLoRA([[0]], objective="segmentation")
    with pytest.raises(ValueError, match="stop_forget_ap"):
        GSLoRA([[0]], stop_forget_ap=150.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        DetectionObjective(mode="ignore")
    with pytest.raises(ValueError, match="aux must be one of"):
        DetectionObjective(aux="both")
    assert issubclass(DetectionObjective, TaskObjective) and issubclass(ClassificationObjective, TaskObjective)


def test_objective_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(GSLoRA, "cb")
    cfg = parser.parse_string("cb: {tasks: [[0]], objective: {class_path: lightning_plugins.callbacks."
                              "DetectionObjective, init_args: {bound: 3.0, mode: background}}}")
    callback = parser.instantiate_classes(cfg).cb
    assert isinstance(callback.objective, DetectionObjective)
    assert (callback.objective.bound, callback.objective.mode) == (3.0, "background")
    callback = parser.instantiate_classes(parser.parse_string("cb: {tasks: [[0]], objective: detection}")).cb
    assert callback.objective == "detection"
    assert parser.instantiate_classes(parser.parse_string("cb: {tasks: [[0]]}")).cb.objective == "auto"


def test_detection_objective_checks_the_module(quiet):
    callback = GSLoRA([[0]], objective="detection", plots=False)
    with pytest.raises(TypeError, match="forgetting_losses and detect"):
        callback.setup(pl.Trainer(**quiet()), TinyClassifier(), "fit")
    with pytest.raises(TypeError, match="not supported by the detection objective"):
        GSLoRA([[0]], prototypes=True, plots=False).setup(pl.Trainer(**quiet()), TinyDetector(), "fit")


# ------------------------------------------------------------------------------------------- classification loss
@pytest.mark.parametrize("per_sample", [False, True])
def test_classification_objective_is_the_gslora_formula(per_sample):
    torch.manual_seed(0)
    model = TinyClassifier()
    x_r, y_r = torch.randn(5, 6), torch.tensor([2, 3, 2, 3, 1])
    x_f, y_f = torch.randn(3, 6), torch.tensor([0, 0, 0])
    groups = [[torch.randn(4, 6), torch.randn(8, 4)], [torch.zeros(4, 8), torch.randn(6, 4)]]
    objective = ClassificationObjective(bound=None, bound_per_sample=None)
    objective.configure([[0]], 7.0, per_sample)
    task_view = view([[0]], 0)
    loss = objective.training_loss(model, {"retain": (x_r, y_r), "forget": (x_f, y_f)},
                                   _context(task_view, groups))
    logits = model(torch.cat([x_r, x_f]))
    retain = F.cross_entropy(logits[:5], y_r)
    if per_sample:
        forget = F.relu(7.0 - F.cross_entropy(logits[5:], y_f, reduction="none")).mean()
    else:
        forget = F.relu(7.0 - F.cross_entropy(logits[5:], y_f))
    expected = retain + 0.3 * forget + 0.01 * _group_lasso(groups)
    assert torch.allclose(loss.total, expected, atol=1e-6)
    assert torch.allclose(loss.forget, forget) and loss.forget_samples == 3 and loss.size == 8
    assert set(loss.values) == {"loss", "retain_ce", "forget_term", "group_lasso", "alpha", "forget_ce"}
    # the same samples as one (x, y) batch, split by label
    mixed = objective.training_loss(model, (torch.cat([x_r, x_f]), torch.cat([y_r, y_f])),
                                    _context(task_view, groups))
    assert torch.allclose(mixed.total, expected, atol=1e-6)
    # an objective's own bound wins over the callback's
    own = ClassificationObjective(bound=2.0)
    own.configure([[0]], 7.0, False)
    assert own.saturation_bound == 2.0 and objective.saturation_bound == 7.0


# ------------------------------------------------------------------------------------------------ detection loss
def _detection_batch():
    data = SquaresDataset(8, 5)
    retain = [data[i] for i in range(4)]
    forget = [data[i] for i in range(4, 8)]
    retain_targets = [filter_target(t, [1, 2]) for _, t in retain]
    forget_targets = [filter_target(t, [0], extra=[1, 2]) for _, t in forget]
    return ([i for i, _ in retain], retain_targets), ([i for i, _ in forget], forget_targets)


@pytest.mark.parametrize("mode", ["bounded", "background"])
def test_detection_objective_loss(mode):
    torch.manual_seed(0)
    model = TinyDetector().eval()
    (images_r, targets_r), (images_f, targets_f) = _detection_batch()
    groups = [[torch.randn(8, 32), torch.randn(64, 8)]]
    objective = DetectionObjective(bound=15.0, mode=mode)
    loss = objective.training_loss(model, {"retain": (images_r, targets_r), "forget": (images_f, targets_f)},
                                   _context(view([[0]], 0), groups, beta=0.25, alpha=0.1))
    r = model.forgetting_losses(images_r, targets_r)
    if mode == "bounded":
        f = model.forgetting_losses(images_f, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets_f])
        forget = F.relu(15.0 - f["cls"]) + f["box"]
        assert torch.allclose(loss.forget, F.relu(15.0 - f["cls"]))
    else:
        f = model.forgetting_losses(images_f, [{"boxes": t["retained_boxes"], "labels": t["retained_labels"]}
                                               for t in targets_f])
        forget = f["cls"] + f["box"]
        assert torch.allclose(loss.forget, forget)
    expected = r["cls"] + r["box"] + 0.25 * forget + 0.1 * _group_lasso(groups)
    assert torch.allclose(loss.total, expected, atol=1e-5), (loss.total, expected)
    assert float(f["cls"]) > 0 and float(f["box"]) > 0 and loss.forget_samples == 4 and loss.size == 8
    assert torch.allclose(loss.values["retain_cls"], r["cls"]) and torch.allclose(loss.values["forget_box"], f["box"])
    assert objective.saturation_bound == (15.0 if mode == "bounded" else None)


def test_detection_objective_aux_terms():
    class WithAux(TinyDetector):
        def forgetting_losses(self, images, targets):
            return {**super().forgetting_losses(images, targets), "ctr": torch.tensor(0.5)}

    model = WithAux().eval()
    (images, targets), _ = _detection_batch()
    base = TinyDetector.forgetting_losses(model, images, targets)
    for aux, cls, box in (("box", 0.0, 0.5), ("cls", 0.5, 0.0), ("ignore", 0.0, 0.0)):
        got = DetectionObjective(aux=aux).parts(model, images, targets)
        assert torch.allclose(got[0], base["cls"] + cls) and torch.allclose(got[1], base["box"] + box)


class ObjectTinyDetector(TinyDetector):
    """``TinyDetector`` that also reports each given object's ``log sigmoid`` class logit at its own cell."""

    def forgetting_losses(self, images, targets, objects=None):
        out = super().forgetting_losses(images, targets)
        if objects is not None:
            logits, _ = self(images)
            values = []
            for i, target in enumerate(objects):
                for b, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                    cell = int((b[1] + b[3]) / 2 // 8) * 4 + int((b[0] + b[2]) / 2 // 8)
                    values.append(F.logsigmoid(logits[i, cell, int(label)]))
            out["object_log_probs"] = torch.stack(values) if values else logits.new_zeros(0)
        return out


@pytest.mark.parametrize("mode", ["bounded", "background"])
def test_detection_objective_object_term(mode):
    torch.manual_seed(0)
    model = ObjectTinyDetector().eval()
    (images_r, targets_r), (images_f, targets_f) = _detection_batch()
    objective = DetectionObjective(bound=15.0, mode=mode, object_bound=3.0)
    objective.check_module(model)
    loss = objective.training_loss(model, {"retain": (images_r, targets_r), "forget": (images_f, targets_f)},
                                   _context(view([[0]], 0), [], beta=0.25, alpha=0.0))
    r = model.forgetting_losses(images_r, targets_r)
    forgotten = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets_f]
    log_probs = model.forgetting_losses(images_f, forgotten, objects=forgotten)["object_log_probs"]
    assert log_probs.numel() == sum(len(t["labels"]) for t in forgotten) > 0
    term = torch.stack([F.relu(3.0 + v) for v in log_probs]).mean()  # by hand: one value per forgotten object
    if mode == "bounded":
        f = model.forgetting_losses(images_f, forgotten)
        assert torch.allclose(loss.forget, term)
        forget = term + f["box"]
    else:
        f = model.forgetting_losses(images_f, [{"boxes": t["retained_boxes"], "labels": t["retained_labels"]}
                                               for t in targets_f])
        forget = f["cls"] + f["box"] + term
        assert torch.allclose(loss.forget, forget)
    assert torch.allclose(loss.total, r["cls"] + r["box"] + 0.25 * forget, atol=1e-5)
    assert torch.allclose(loss.values["forget_object_prob"], log_probs.exp().mean())
    assert objective.saturation_bound == (3.0 if mode == "bounded" else None)
    # the term's gradient on a recognised object's logit does not fade as its probability falls (unlike focal loss)
    logit = torch.tensor([2.0, -2.0], requires_grad=True)
    objective.object_term(F.logsigmoid(logit)).backward()
    assert torch.allclose(logit.grad, 0.5 * torch.sigmoid(-logit), atol=1e-6)
    assert objective.object_term(torch.tensor([-3.5, -4.0])) == 0  # past the bound: nothing left to push


def test_detection_objective_object_term_errors():
    with pytest.raises(ValueError, match="object_bound must be > 0"):
        DetectionObjective(object_bound=0.0)
    objective = DetectionObjective(object_bound=4.0)
    objective.configure([[0]], 15.0, False)
    with pytest.raises(TypeError, match="has no `objects` argument"):
        objective.check_module(TinyDetector())


def test_object_term_reduced_per_object():
    log_probs = torch.tensor([-1.0, -2.0, -4.0, -3.5, -0.5, -5.0], requires_grad=True)
    owners = torch.tensor([0, 0, 0, 1, 2, 2])
    # bound 3: excesses 2, 1, 0 | 0 | 2.5, 0. Object 0: (2 + 1) / 2 reporting places = 1.5; object 1 is reported
    # nowhere: 0; object 2: 2.5 / 1 = 2.5.
    # "reported": the mean over the two objects still reported, 2.0
    reported = DetectionObjective(object_bound=3.0, object_reduction="reported")
    term = reported.object_term(log_probs, owners)
    assert term.item() == pytest.approx(2.0)
    term.backward()
    assert torch.allclose(log_probs.grad, torch.tensor([0.25, 0.25, 0.0, 0.0, 0.5, 0.0]))
    # "objects": the mean over all three objects, 4 / 3; each object's push is a third
    log_probs.grad = None
    objects = DetectionObjective(object_bound=3.0, object_reduction="objects")
    term = objects.object_term(log_probs, owners)
    assert term.item() == pytest.approx(4.0 / 3.0)
    term.backward()
    assert torch.allclose(log_probs.grad, torch.tensor([1 / 6, 1 / 6, 0.0, 0.0, 1 / 3, 0.0]))
    # an object number with no location at all (object 3 here) is not counted
    skipped = objects.object_term(log_probs.detach(), torch.tensor([0, 0, 0, 1, 4, 4]))
    assert skipped.item() == pytest.approx(4.0 / 3.0)
    # the earlier reduction: the mean over all six places, so the three reporting places share 1/6 each
    places = DetectionObjective(object_bound=3.0).object_term(log_probs.detach(), owners)
    assert places.item() == pytest.approx(5.5 / 6)
    for objective in (reported, objects):
        done = objective.object_term(torch.tensor([-3.5, -4.0]), torch.tensor([0, 1]))
        assert done.item() == 0
    with pytest.raises(ValueError, match="object_reduction must be one of"):
        DetectionObjective(object_bound=3.0, object_reduction="max")
    with pytest.raises(ValueError, match="needs the object of each log-probability"):
        reported.object_term(torch.tensor([-1.0, -2.0]), None)


def test_object_reduction_objects_needs_the_object_index():
    model = ObjectTinyDetector().eval()
    (images_r, targets_r), (images_f, targets_f) = _detection_batch()
    forgotten = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets_f]
    for reduction in ("objects", "reported"):
        objective = DetectionObjective(object_bound=3.0, object_reduction=reduction)
        with pytest.raises(TypeError, match=f"reduction='{reduction}'.*'object_index'.*object_reduction='places'"):
            objective.parts(model, images_f, forgotten, forgotten)
    # reported share: objects whose best location is above -bound, among the objects with a location
    share = reported_share(torch.tensor([-1.0, -5.0, -4.0, -0.1]), torch.tensor([0, 0, 1, 3]), 3.0)
    assert share.item() == pytest.approx(2 / 3)


class IndexedObjectTinyDetector(ObjectTinyDetector):
    """``ObjectTinyDetector`` that also numbers the object of each log-probability (one value per object)."""

    def forgetting_losses(self, images, targets, objects=None):
        out = super().forgetting_losses(images, targets, objects)
        if objects is not None:
            out["object_index"] = torch.arange(sum(len(t["labels"]) for t in objects))
        return out


def _second_task_batch():
    """A second-task batch of the squares data: class 0 forgotten earlier (old), class 1 now, class 2 retained."""
    data = SquaresDataset(12, 5)
    retain = [data[i] for i in range(4)]
    forget = [data[i] for i in range(4, 12)]
    forget_targets = [filter_target(t, [0, 1], extra=[2]) for _, t in forget]
    batch = {"retain": ([i for i, _ in retain], [filter_target(t, [2]) for _, t in retain]),
             "forget": ([i for i, _ in forget], forget_targets)}
    return batch, [i for i, _ in forget], [{"boxes": t["boxes"], "labels": t["labels"]} for t in forget_targets]


@pytest.mark.parametrize("old_objects", ["separate", "pooled", "background"])
def test_object_term_on_old_categories(old_objects):
    torch.manual_seed(0)
    model = IndexedObjectTinyDetector().eval()
    batch, images_f, forgotten = _second_task_batch()
    labels = torch.cat([t["labels"] for t in forgotten])
    assert (labels == 0).any() and (labels == 1).any()  # the batch holds old and current objects
    objective = DetectionObjective(mode="bounded", object_bound=3.0, old_objects=old_objects)
    loss = objective.training_loss(model, batch, _context(view([[0], [1]], 1), [], beta=0.25, alpha=0.0))
    # by hand: one value per object; the current (1) and the old (0) objects' excesses
    excess = F.relu(3.0 + model.forgetting_losses(images_f, forgotten, objects=forgotten)["object_log_probs"])
    current, old = excess[labels == 1], excess[labels == 0]
    expected = {"separate": current.mean() + 0.5 * old.mean(),  # old_weight 0.5 by default
                "pooled": excess.mean(), "background": current.mean()}
    assert torch.allclose(loss.forget, expected[old_objects], atol=1e-6), (loss.forget, expected)
    assert float(current.mean().detach()) > 0 and float(old.mean().detach()) > 0
    # on a first task (nothing old) the three are the same term
    first = objective.training_loss(model, batch, _context(view([[0, 1]], 0), [], beta=0.25, alpha=0.0))
    assert torch.allclose(first.forget, excess.mean(), atol=1e-6)
    if old_objects == "separate":  # the old objects' mean weighted
        weighted = DetectionObjective(mode="bounded", object_bound=3.0, old_weight=0.4)
        loss = weighted.training_loss(model, batch, _context(view([[0], [1]], 1), [], beta=0.25, alpha=0.0))
        assert torch.allclose(loss.forget, current.mean() + 0.4 * old.mean(), atol=1e-6)


def test_old_objects_separate_needs_the_object_index():
    batch, _, _ = _second_task_batch()
    objective = DetectionObjective(mode="bounded", object_bound=3.0)
    with pytest.raises(ValueError, match="old_objects='separate'.*'object_index'.*old_objects='pooled'"):
        objective.training_loss(ObjectTinyDetector().eval(), batch, _context(view([[0], [1]], 1), []))
    with pytest.raises(ValueError, match="old_objects must be one of"):
        DetectionObjective(object_bound=3.0, old_objects="drop")
    with pytest.raises(ValueError, match="old_weight must be >= 0, got -1"):
        DetectionObjective(object_bound=3.0, old_weight=-1)


# ------------------------------------------------------------------------------------------------ detection data
class HandBoxes(torch.utils.data.Dataset):
    """Five images with known objects (box i of image k is [k, i, k + 1, i + 1]); no fast label methods."""

    LABELS = [[0, 1], [1], [2, 0], [2], [1, 2, 3]]

    def __len__(self):
        return len(self.LABELS)

    def __getitem__(self, k):
        labels = self.LABELS[k]
        boxes = torch.tensor([[k, i, k + 1, i + 1] for i in range(len(labels))], dtype=torch.float32)
        return torch.full((3, 4, 4), float(k)), {"boxes": boxes, "labels": torch.tensor(labels), "image_id": k}


class FastHandBoxes(HandBoxes):
    def image_labels(self):
        return [set(labels) for labels in self.LABELS]


class HandModule(pl.LightningDataModule):
    def __init__(self, dataset):
        super().__init__()
        self.train_set = dataset
        self.val_set = dataset


def _kept(dataset):
    out = {}
    for i in range(len(dataset)):
        image, target = dataset[i]
        k = int(image[0, 0, 0])
        out[k] = (target["labels"].tolist(), target["boxes"][:, 1].long().tolist(), target.get("retained_labels"))
        assert target["image_id"] == k
        if "retained_labels" in target:
            out[k] = out[k][:2] + (target["retained_labels"].tolist(), target["retained_boxes"][:, 1].long().tolist())
    return out


@pytest.mark.parametrize("dataset", [HandBoxes(), FastHandBoxes()], ids=["read-items", "image_labels"])
def test_detection_data_keeps_exactly_the_task_annotations(dataset):
    assert image_labels(dataset) == [set(labels) for labels in HandBoxes.LABELS]
    dm = DetectionForgettingDataModule(HandModule(dataset), replay_ratio=1.0, batch_size=2)
    dm.setup("fit")
    dm.set_forgetting_task(0, [0], [])
    # forget: images with class 0, only their class-0 objects (row i of the box = its index in the image), the
    # retained objects aside; retain: images with a retained class, only retained objects
    assert _kept(dm.forget_dataset()) == {0: ([0], [0], [1], [1]), 2: ([0], [1], [2], [0])}
    assert _kept(dm.retain_dataset()) == {0: ([1], [1], None), 1: ([1], [0], None), 2: ([2], [0], None),
                                          3: ([2], [0], None), 4: ([1, 2, 3], [0, 1, 2], None)}
    dm.set_forgetting_task(1, [3], [0])
    assert _kept(dm.forget_dataset()) == {4: ([3], [2], [1, 2], [0, 1])}
    assert _kept(dm.retain_dataset()) == {0: ([1], [1], None), 1: ([1], [0], None), 2: ([2], [0], None),
                                          3: ([2], [0], None), 4: ([1, 2], [0, 1], None)}
    batch = next(iter(dm.train_dataloader()["forget"]))
    images, targets = batch
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 1
    assert len(dm.val_dataloader().dataset) == 5  # evaluation: the full split, untouched
    dm.set_forgetting_task(0, [5], [])
    with pytest.raises(ValueError, match="appear in no training image"):
        dm.task_samples()


def test_detection_data_shots_and_seeds():
    def draw(seed, task=0):
        dm = DetectionForgettingDataModule(HandModule(FastHandBoxes()), shots=1, seed=seed)
        dm.setup("fit")
        dm.set_forgetting_task(task, [0], [])
        return dm.task_samples()

    samples = draw(0)
    assert len(samples.forget) == 1 and samples.forget[0] in (0, 2)
    assert 1 <= len(samples.retain) <= 3 and samples.forgotten == (0,) and samples.retained == (1, 2, 3)
    assert draw(0) == samples  # seeded: the same subsets in another run
    assert {draw(s).forget[0] for s in range(8)} == {0, 2}
    collated = detection_collate([HandBoxes()[0], HandBoxes()[1]])
    assert len(collated[0]) == 2 and collated[1][1]["labels"].tolist() == [1]


# ---------------------------------------------------------------------------------------------------- AP splits
class FixedDetections(nn.Module):
    def __init__(self, predictions):
        super().__init__()
        self.predictions = predictions

    def detect(self, images):
        return [self.predictions[int(image[0, 0, 0])] for image in images]


def test_ap_splits_against_hand_computed_values():
    # image k holds class k's object; perfect detections for retained (1, 2) and old (3) classes, none for the
    # forgotten class 0; class 4 is forgotten too but has no ground truth anywhere: it counts for no split
    box = torch.tensor([[2.0, 2.0, 12.0, 12.0]])
    targets = [{"boxes": box, "labels": torch.tensor([k])} for k in range(4)]
    images = [torch.full((3, 16, 16), float(k)) for k in range(4)]
    perfect = {k: {"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([k])} for k in (1, 2, 3)}
    perfect[0] = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    objective = DetectionObjective()
    metric = objective.new_metric()
    assert not objective.measured(metric)
    objective.update_metric(metric, FixedDetections(perfect), (images, targets))
    assert objective.measured(metric)
    task_view = view([[3], [0, 4]], 1)
    out = objective.compute_metric(metric, task_view)
    assert out == {"ap_f": 0.0, "n_forgotten": 1, "ap_r": 100.0, "n_retained": 2, "ap_o": 100.0, "n_old": 1,
                   "ap_class/0": 0.0, "ap_class/1": 100.0, "ap_class/2": 100.0, "ap_class/3": 100.0}
    drop, h = drop_and_h(out["ap_f"], out["ap_r"], 80.0)
    assert drop == 80.0 and h == pytest.approx(2 * 80 * 100 / 180)
    # a wrong class for the forgotten object: still AP 0 for it, and a false positive for class 1 halves nothing
    # of class 1's AP (its true object scores higher)
    wrong = dict(perfect)
    wrong[0] = {"boxes": box, "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}
    metric = objective.new_metric()
    objective.update_metric(metric, FixedDetections(wrong), (images, targets))
    assert objective.compute_metric(metric, task_view)["ap_r"] == 100.0
    assert split_average_precision(torch.tensor([0.5, -1.0]), torch.tensor([1, 0]), task_view) == {
        "ap_f": None, "n_forgotten": 0, "ap_r": 50.0, "n_retained": 1, "ap_o": None, "n_old": 0}


# ------------------------------------------------------------------------------------------------- end to end
class Recorder(Callback):
    """Before GSLoRA's on_train_end (it merges): the unmerged model's outputs on fixed images, and which module
    methods the callback replaced during the fit."""

    def __init__(self, images):
        self.images = images

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.replaced = sorted(k for k in ("training_step", "validation_step", "configure_optimizers")
                               if k in pl_module.__dict__)

    def on_train_end(self, trainer, pl_module):
        assert find_lora(pl_module)
        with torch.no_grad():
            self.outputs = [t.clone() for t in pl_module.eval()(self.images)]
            self.detections = pl_module.detect(self.images)
        pl_module.train()


def _forget_detection(make, quiet, mode, epochs):
    torch.manual_seed(0)
    model = make()
    keys = set(model.state_dict())
    data = SquaresDataModule()
    images = [data.val_set[i][0] for i in range(8)]
    recorder = Recorder(images)
    callback = GSLoRA([[0]], objective=DetectionObjective(bound=3.0, mode=mode), beta=1.0, lr=1e-2, plots=False)
    datamodule = DetectionForgettingDataModule(data, replay_ratio=0.5, batch_size=8)
    pl.Trainer(max_epochs=epochs, callbacks=[recorder, callback], **quiet()).fit(model, datamodule)
    return model, keys, recorder, callback


def test_detection_forgetting_end_to_end(pretrained_detector, quiet):
    model, keys, recorder, callback = _forget_detection(pretrained_detector, quiet, "bounded", 12)
    (row,) = callback.task_results()
    assert row["ap_f_before"] > 25 and row["ap_f"] < 0.5 * row["ap_f_before"], row
    assert row["ap_r"] > row["ap_r_before"] - 10, row
    assert row["drop"] == pytest.approx(row["ap_f_before"] - row["ap_f"]) and row["h"] > 0
    assert "acc_f" not in row and row["ap_o"] is None and row["ap_class/class0"] == row["ap_f"]
    val_rows = [r for r in callback.history if r["kind"] == "val"]
    assert val_rows and all("ap_f" in r for r in val_rows)
    # the module's own validation_step ran (not replaced); the training step and optimizer were the callback's
    assert recorder.replaced == ["configure_optimizers", "training_step"]
    assert model.validated > 0 and "validation_step" not in model.__dict__ and "training_step" not in model.__dict__
    # merged (and unloaded) model = the model with its adapters, unmerged
    assert not find_lora(model) and set(model.state_dict()) == keys
    model.eval()
    with torch.no_grad():
        merged = model(recorder.images)
        detections = model.detect(recorder.images)
    for before, after in zip(recorder.outputs, merged):
        assert torch.allclose(before, after, atol=1e-5)
    for before, after in zip(recorder.detections, detections):
        assert torch.equal(before["labels"], after["labels"])
        assert torch.allclose(before["scores"], after["scores"], atol=1e-5)


def test_detection_evaluation_reuses_the_modules_own_predictions(quiet):
    class Counting(TinyDetector):
        """Returns its predictions from validation_step (as ObjectDetector does); counts detect calls made inside
        validation batches (the callback's own before/after passes are other calls)."""

        in_batch = False
        batch_calls = 0

        def detect(self, images):
            self.batch_calls += self.in_batch
            return super().detect(images)

        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            return {"predictions": self.detect(batch[0])}

    class BatchWindow(Callback):  # listed after GSLoRA: its batch-end hook runs after GSLoRA's
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            pl_module.in_batch = True

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            pl_module.in_batch = False

    torch.manual_seed(0)
    model = Counting()
    callback = GSLoRA([[0]], objective=DetectionObjective(bound=3.0), beta=1.0, lr=1e-2, plots=False,
                      early_stop=False)
    datamodule = DetectionForgettingDataModule(SquaresDataModule(val=32), replay_ratio=0.5, batch_size=8)
    pl.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback, BatchWindow()], **quiet()).fit(
        model, datamodule)
    # one detect per validation batch (the module's), not two; the callback still measured AP from them
    assert model.validated > 0 and model.batch_calls == model.validated
    assert [r for r in callback.history if r["kind"] == "val" and r["ap_f"] is not None]


def test_detection_forgetting_background_mode(pretrained_detector, quiet):
    model, _, _, callback = _forget_detection(pretrained_detector, quiet, "background", 8)
    (row,) = callback.task_results()
    assert row["ap_f"] < 0.5 * row["ap_f_before"] and row["ap_r"] > row["ap_r_before"] - 10, row


def test_detection_evaluation_helper(pretrained_detector, quiet):
    model = pretrained_detector()
    trainer = pl.Trainer(**quiet())
    objective = DetectionObjective()
    data = SquaresDataModule()
    out = evaluate_split_metrics(trainer, model, objective, [data.val_dataloader()], view([[0], [1]], 1))
    objective.check_module(model)  # reads class_names
    out = evaluate_split_metrics(trainer, model, objective, [data.val_dataloader()], view([[0], [1]], 1))
    assert set(out) == {"ap_f", "ap_r", "ap_o", "n_forgotten", "n_retained", "n_old", "ap_class/class0",
                        "ap_class/class1", "ap_class/class2"}
    assert out["n_forgotten"] == out["n_old"] == out["n_retained"] == 1 and out["ap_f"] > 20


def test_detection_resume_mid_sequence_is_exact(pretrained_detector, quiet, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_plugins.callbacks import forget_sequence

    def run(root, ckpt_path=None):
        model = pretrained_detector()
        data = DetectionForgettingDataModule(SquaresDataModule(), replay_ratio=0.5, batch_size=8)
        callback = GSLoRA([[0], [1]], objective=DetectionObjective(bound=3.0), beta=1.0, lr=1e-2, plots=False,
                          early_stop=False)
        folders = iter(range(10))

        def make(task_index):
            checkpoint = ModelCheckpoint(dirpath=str(root / f"fit{next(folders)}"), filename="{epoch}",
                                         save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
            return pl.Trainer(max_epochs=3, callbacks=[callback, checkpoint],
                              **quiet(enable_checkpointing=True, default_root_dir=str(root)))

        forget_sequence(model, data, callback, trainer=make, ckpt_path=ckpt_path)
        return model, callback

    full_model, full = run(tmp_path / "full")
    resumed_model, resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "full" / "fit0" / "epoch=1.ckpt"))
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    rows = resumed.task_results()
    assert [r["forgotten"] for r in rows] == [[0], [1]] and rows[1]["ap_o"] is not None


def test_detection_data_can_keep_forgetting_old_categories():
    from lightning_plugins.callbacks.gslora.detection_data import select_detection_samples

    # image k holds category k % 4; task 1 forgets {1} after {0}
    labels = [{k % 4} for k in range(40)]
    task = view([[0], [1]], 1)
    plain = select_detection_samples(labels, task, replay_ratio=1.0, forget_ratio=1.0)
    kept = select_detection_samples(labels, task, replay_ratio=1.0, forget_ratio=1.0, include_old=True)
    assert plain.forgotten == (1,) and kept.forgotten == (0, 1)
    assert {k % 4 for k in plain.forget} == {1} and {k % 4 for k in kept.forget} == {0, 1}
    assert plain.retain == kept.retain and {k % 4 for k in kept.retain} == {2, 3}
