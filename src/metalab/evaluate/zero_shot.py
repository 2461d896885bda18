"""Zero-shot classification of every test image among all of the test classes (Snell et al. 2017,
§3.3; :mod:`metalab.methods.protonet_zero`), beside the fixed zero-shot episodes of
:func:`metalab.evaluate.evaluate`.
"""

from __future__ import annotations

import numpy as np
import torch

from metalab.data.cub import AttributeDataset
from metalab.evaluate.protocol import Result, answer_protocol, confidence_interval, eval_mode


@torch.no_grad()
def evaluate_zero_shot_all(
    method: torch.nn.Module,
    dataset: AttributeDataset,
    device: torch.device | str = "cpu",
    batch: int = 4096,
) -> Result:
    """Top-1 accuracy of classifying every image of ``dataset`` (middle crop) among all of its
    classes, averaged over images, with a 95% interval over images.

    On CUB's test part: every test image among the 50 unseen classes, as Reed et al. 2016's
    evaluation code (``classify_sje_tcnn.lua``) scores the numbers the paper compares with.
    ``method.predict(attributes (C, A), labels (C,), features (n, D))`` gives logits ``(n, C)``."""
    correct = []
    with eval_mode(method):
        attributes = dataset.attributes.to(device)
        labels = torch.arange(dataset.num_classes, device=device)
        middle = dataset.features[:, 0]  # (n, D)
        for start in range(0, len(middle), batch):
            query = middle[start : start + batch].to(device)
            predicted = method.predict(attributes, labels, query).argmax(-1).cpu().numpy()
            correct.append(predicted == dataset.labels[start : start + batch])
    mean, ci = confidence_interval(np.concatenate(correct).astype(np.float64))
    protocol = {
        "dataset": dataset.name,
        "ways": dataset.num_classes,
        "shots": 0,
        "queries": "all images",
        "images": int(len(middle)),
        "crop": "middle",
        **answer_protocol(method),
    }
    return Result(mean, ci, protocol)
