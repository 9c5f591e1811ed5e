"""A tiny real detector implementing the GSLoRA detection protocol, and synthetic box data for it.

``TinyDetector``: a stride-8 patch stem (32x32 images -> a 4x4 grid of tokens), residual MLP blocks named
``blocks.N.mlp.fc1/fc2`` (the FFN layers GSLoRA adapts), a per-cell sigmoid classification head (focal loss,
normalised by the number of objects) and a per-cell box head (L1 on normalised cx, cy, w, h): each object is
assigned to the cell holding its centre. ``detect`` decodes every (cell, class) with a score above 0.05.

``SquaresDataset``: coloured squares on a dark background, class c drawn in its own colour, at most one object per
grid cell, 1-3 objects per image.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import sigmoid_focal_loss

from lightning_plugins.callbacks.gslora.detection_data import detection_collate

SIZE, STRIDE = 32, 8
GRID = SIZE // STRIDE
COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1]])


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.fc2 = nn.Linear(2 * dim, dim)
        self.mix = nn.Linear(GRID * GRID, GRID * GRID)  # token mixing (not adapted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(x.transpose(1, 2)).transpose(1, 2)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm(x))))


class TinyDetector(pl.LightningModule):
    gslora_target = r"blocks\.(?P<block>\d+)\.mlp\.fc[12]"

    def __init__(self, num_classes: int = 3, dim: int = 32, depth: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_names = [f"class{c}" for c in range(num_classes)]
        self.lr = lr
        self.stem = nn.Conv2d(3, dim, STRIDE, STRIDE)
        self.pos = nn.Parameter(torch.zeros(GRID * GRID, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.cls_head = nn.Linear(dim, num_classes)
        self.box_head = nn.Linear(dim, 4)
        nn.init.constant_(self.cls_head.bias, -2.0)
        self.validated = 0

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(torch.stack(list(images))).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.cls_head(x), self.box_head(x).sigmoid()

    def encode(self, targets: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls = torch.zeros(len(targets), GRID * GRID, self.num_classes, device=device)
        box = torch.zeros(len(targets), GRID * GRID, 4, device=device)
        pos = torch.zeros(len(targets), GRID * GRID, dtype=torch.bool, device=device)
        for i, target in enumerate(targets):
            for b, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
                cell = int(cy // STRIDE) * GRID + int(cx // STRIDE)
                cls[i, cell, int(label)] = 1.0
                box[i, cell] = torch.tensor([cx / SIZE, cy / SIZE, (b[2] - b[0]) / SIZE, (b[3] - b[1]) / SIZE])
                pos[i, cell] = True
        return cls, box, pos

    def forgetting_losses(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        logits, boxes = self(images)
        cls_t, box_t, pos = self.encode(targets, logits.device)
        num = max(1.0, float(pos.sum()))
        cls = sigmoid_focal_loss(logits, cls_t, reduction="sum") / num
        box = 5.0 * F.l1_loss(boxes[pos], box_t[pos], reduction="sum") / num if pos.any() else boxes.sum() * 0
        return {"cls": cls, "box": box}

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        logits, boxes = self(images)
        scores = logits.sigmoid()
        out = []
        for s, b in zip(scores, boxes):
            cell, label = (s > 0.05).nonzero(as_tuple=True)
            cx, cy, w, h = (b[cell] * SIZE).unbind(-1)
            xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
            out.append({"boxes": xyxy, "scores": s[cell, label], "labels": label})
        return out

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.forgetting_losses(images, targets)
        return losses["cls"] + losses["box"]

    def validation_step(self, batch, batch_idx):
        self.validated += 1
        images, targets = batch
        losses = self.forgetting_losses(images, targets)
        self.log("val_loss", losses["cls"] + losses["box"], batch_size=len(images))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class SquaresDataset(Dataset):
    """``(image, {"boxes", "labels", "image_id"})`` items; ``fast=False`` hides ``image_labels``/``annotations_of``."""

    def __init__(self, n: int, seed: int, num_classes: int = 3) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(n):
            count = int(torch.randint(1, 4, (1,), generator=generator))
            cells = torch.randperm(GRID * GRID, generator=generator)[:count].tolist()
            image = 0.05 * torch.rand(3, SIZE, SIZE, generator=generator)
            boxes, labels = [], []
            for cell in cells:
                label = int(torch.randint(0, num_classes, (1,), generator=generator))
                side = int(torch.randint(5, 8, (1,), generator=generator))
                x0 = (cell % GRID) * STRIDE + int(torch.randint(0, STRIDE - side + 1, (1,), generator=generator))
                y0 = (cell // GRID) * STRIDE + int(torch.randint(0, STRIDE - side + 1, (1,), generator=generator))
                image[:, y0:y0 + side, x0:x0 + side] = COLOURS[label].view(3, 1, 1)
                boxes.append([x0, y0, x0 + side, y0 + side])
                labels.append(label)
            self.items.append((image, {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                       "labels": torch.tensor(labels, dtype=torch.long),
                                       "image_id": torch.tensor(index)}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image, target = self.items[index]
        return image, dict(target)

    def image_labels(self) -> list[set[int]]:
        return [set(t["labels"].tolist()) for _, t in self.items]

    def annotations_of(self, index: int) -> dict:
        return dict(self.items[index][1])


class SquaresDataModule(pl.LightningDataModule):
    def __init__(self, train: int = 96, val: int = 48, batch_size: int = 16, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.train_set = SquaresDataset(train, 0, num_classes)
        self.val_set = SquaresDataset(val, 1, num_classes)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=detection_collate)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=detection_collate)
