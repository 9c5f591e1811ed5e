"""The embedded face data: scikit-image's ``lfw_subset`` faces as *instance identities*.

No package that installs offline ships several photos per person, so every one of the 100 LFW face crops in
scikit-image (25x25 grey) is treated as its own identity, and a sample is a randomly augmented *view* of it
(similarity warp, mirror, brightness, contrast, noise). Identification is then "which of the training faces is
this view of", verification is "are these two views of the same face". Training identities and held-out
identities are disjoint, so verification on the held-out ones measures an embedding that generalises to faces
it never saw. What it does not measure: invariance to real changes of a person (pose, age, light, expression);
for that, bring identity folders or an InsightFace ``.rec`` and ``.bin`` sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# The augmentation that makes a view (the bounds are uniform draws, one per view).
VIEW_AUGMENTATION = {
    "rotation_degrees": 10.0, "scale": 0.10, "shift": 0.06, "flip_probability": 0.5,
    "brightness": 0.2, "contrast": (0.7, 1.3), "noise_std": 0.03,
}


def load_lfw_subset_faces() -> torch.Tensor:
    """The 100 face crops of ``skimage.data.lfw_subset()`` as ``[100, 1, 25, 25]`` float in [0, 1]."""
    try:
        from skimage.data import lfw_subset
    except ImportError as err:
        raise ImportError(
            "the embedded face data comes from scikit-image's lfw_subset; install it with "
            "`pip install 'lightning-plugins[face]'` (or `pip install scikit-image`)"
        ) from err
    crops = torch.from_numpy(lfw_subset()).float()  # first 100 faces, last 100 non-faces
    return crops[:100].unsqueeze(1).contiguous()


def make_views(faces: torch.Tensor, views: int, seed: int, image_size: int = 32) -> torch.Tensor:
    """``views`` augmented views of every face: ``[N, C, h, w]`` -> ``[N * views, 3, S, S]`` float in [0, 1].

    Views are ordered face by face (the views of face 0 first). The draw depends only on ``seed``, so the same
    seed gives the same views on any machine; use different seeds for training and evaluation views.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    generator = torch.Generator().manual_seed(seed)
    images = faces.repeat_interleave(views, dim=0)
    count = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    aug = VIEW_AUGMENTATION
    angle = uniform(-aug["rotation_degrees"], aug["rotation_degrees"]) * math.pi / 180
    zoom = uniform(1 - aug["scale"], 1 + aug["scale"])
    shift = torch.stack([uniform(-aug["shift"], aug["shift"]), uniform(-aug["shift"], aug["shift"])], dim=1)
    mirror = torch.where(torch.rand(count, generator=generator) < aug["flip_probability"], -1.0, 1.0)
    brightness = uniform(-aug["brightness"], aug["brightness"])
    contrast = uniform(*aug["contrast"])
    noise = torch.randn(count, 1, image_size, image_size, generator=generator) * aug["noise_std"]
    # output pixel -> input pixel map in affine_grid's [-1, 1] coordinates: mirror, rotate, zoom out, shift
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / zoom * mirror
    theta[:, 0, 1] = -torch.sin(angle) / zoom
    theta[:, 1, 0] = torch.sin(angle) / zoom * mirror
    theta[:, 1, 1] = torch.cos(angle) / zoom
    theta[:, :, 2] = shift * 2
    grid = nn.functional.affine_grid(theta, [count, images.shape[1], image_size, image_size], align_corners=False)
    warped = nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    warped = (warped - mean) * contrast.view(-1, 1, 1, 1) + mean + brightness.view(-1, 1, 1, 1)
    warped = (warped + noise).clamp(0.0, 1.0)
    return warped.expand(-1, 3, -1, -1).contiguous() if warped.shape[1] == 1 else warped


@dataclass(frozen=True)
class InstanceIdentitySplit:
    """Views of the embedded faces, split for training, identification and open-set verification.

    ``train``/``val``/``test`` hold views of the training identities (labels ``0 .. num_train-1``), drawn with
    different seeds; ``heldout_val``/``heldout_test`` hold views of the remaining identities (never trained on)
    for verification, also drawn with different seeds.
    Images are float ``[N, 3, S, S]`` in [0, 1].
    """

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    heldout_val: tuple[torch.Tensor, torch.Tensor]
    heldout_test: tuple[torch.Tensor, torch.Tensor]


def instance_identity_split(
    train_identities: int = 80, train_views: int = 40, eval_views: int = 10, image_size: int = 32, seed: int = 0
) -> InstanceIdentitySplit:
    """Build the embedded split: the first ``train_identities`` faces are trained on, the rest held out."""
    faces = load_lfw_subset_faces()
    if not 1 < train_identities < len(faces) - 1:
        raise ValueError(
            f"train_identities must leave at least 2 of the {len(faces)} faces for held-out verification and "
            f"keep at least 2 for training; got {train_identities}"
        )

    def views_of(subset: torch.Tensor, count: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = make_views(subset, count, seed * 1000 + stream, image_size)
        return images, torch.arange(len(subset)).repeat_interleave(count)

    known, unknown = faces[:train_identities], faces[train_identities:]
    return InstanceIdentitySplit(
        train=views_of(known, train_views, 1), val=views_of(known, eval_views, 2),
        test=views_of(known, eval_views, 3), heldout_val=views_of(unknown, eval_views, 4),
        heldout_test=views_of(unknown, eval_views, 5),
    )
