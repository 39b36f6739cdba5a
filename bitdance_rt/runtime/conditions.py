"""What a generation is conditioned on, in the one form the loop needs.

A condition is a batch of B images' worth of conditioning that the loop can slice into chunks
(`len`, slicing) and turn into prefill rows: `rows(guided)` gives the conditional rows and, with
classifier-free guidance, the unconditional rows after them. ImageNet: class labels and the null
class (`ClassCondition`, what a plain list of labels becomes). Text-to-image: prompt token ids
(`bitdance_rt.t2i.prompt.PromptCondition`). Backends receive `rows(...)` unchanged: a label
tensor, or a dict of named prefill inputs.

Conditions are made from checked values (runtime/params.GenerationParams: labels in range, prompts
within the token limit) and trusted here: nothing is re-checked. (A label out of range would be the
null class or past the embedding table; GenerationParams.create refuses it at the front door, and
the Pipeline takes only params checked for its own model.)
"""

from __future__ import annotations

from typing import Protocol

import torch


class Condition(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, s: slice) -> "Condition": ...

    def rows(self, guided: bool): ...


class ClassCondition:
    def __init__(self, labels, num_classes: int):
        self.labels = [int(l) for l in labels]
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, s: slice) -> "ClassCondition":
        return ClassCondition(self.labels[s], self.num_classes)

    def rows(self, guided: bool) -> torch.Tensor:
        cond = torch.as_tensor(self.labels, dtype=torch.int64)
        return torch.cat([cond, torch.full_like(cond, self.num_classes)]) if guided else cond


def as_condition(condition, cfg):
    """A list/tensor of (checked) labels becomes a ClassCondition; conditions pass through."""
    if hasattr(condition, "rows"):
        return condition
    return ClassCondition(condition, cfg.num_classes)


def row_count(rows) -> int:
    """Rows of prefill inputs: a tensor's first dim, or that of a dict's first tensor."""
    first = next(iter(rows.values())) if isinstance(rows, dict) else rows
    return int(first.shape[0])
