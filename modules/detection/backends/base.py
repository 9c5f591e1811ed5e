"""The contract every detection backend implements, so that ``ObjectDetector`` (and forgetting) treat torchvision,
transformers and mmdet detectors alike.

Batch contract (the same for every backend):

* ``images``: a list of float tensors ``[3, H, W]`` in [0, 1] (sizes may differ);
* ``targets``: a list of dicts ``{"boxes": float [N, 4] (x1, y1, x2, y2) in pixels, "labels": int64 [N] in
  0..num_classes-1}`` (``N`` may be 0);
* predictions: a list of dicts ``{"boxes": float [K, 4] xyxy pixels of the input image, "scores": float [K],
  "labels": int64 [K] in 0..num_classes-1}``.

Each backend converts to its library's own format inside (label offsets of softmax heads, normalised cxcywh boxes,
``DetDataSample``...), so nothing of that leaks out.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

Target = dict[str, torch.Tensor]
Prediction = dict[str, torch.Tensor]


class DetectionBackend(nn.Module):
    """Adapter around one detector. Subclasses set ``num_classes`` and implement the four methods below.

    The wrapped detector must be a submodule (so parameters, ``state_dict``, precision plugins and ``GSLoRA`` see
    it). Training vs evaluation follows ``self.training`` as usual; :meth:`losses` must work in both modes (a
    forgetting objective evaluates losses on a frozen model), :meth:`predict` returns detections in either mode.
    """

    num_classes: int
    #: regular expression of the FFN ``nn.Linear`` layers ``GSLoRA`` should adapt, or ``None`` for its defaults
    gslora_target: Optional[str] = None

    def losses(self, images: list[torch.Tensor], targets: list[Target]) -> dict[str, torch.Tensor]:
        """The library's training loss terms for the batch, already weighted: their sum is the training loss."""
        raise NotImplementedError

    def split_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"cls": classification part, "box": localisation part}`` of :meth:`losses`' output (``cls + box`` is
        the part of the total that forgetting objectives act on; auxiliary-layer terms go to the same parts)."""
        raise NotImplementedError

    def losses_and_object_log_probs(self, images: list[torch.Tensor], targets: list[Target], objects: list[Target]
                                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """:meth:`losses` on ``targets`` and, from the same forward pass, ``log p(label)`` of every object of
        ``objects`` (one target dict per image, same format) at every place the detector could report it from
        (dense heads: each location whose anchor centre lies inside the object's box), one flat tensor over the
        batch, with the object each value belongs to (objects numbered over the batch, image by image).
        Forgetting objectives push these down on the objects to forget."""
        raise NotImplementedError(
            f"the {type(self).__name__} detection backend does not expose per-object class log-probabilities; "
            "the object term of DetectionObjective (object_bound) is supported by the torchvision FCOS and RetinaNet "
            "backends; use object_bound=None (the paper's bounded term) with this backend"
        )

    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        """Detections per image (see the module docstring), best first, at most the backend's per-image limit."""
        raise NotImplementedError
