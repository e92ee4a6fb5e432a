"""Moving the head's weights in and out of plain numpy dicts, shape-checked."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from shared_model.ranker import HeadConfig, RankerHead, shrink_toward_init


class ModelStateError(ValueError):
    """Weights that do not fit the model: names the key and the problem."""


def check_state(head: RankerHead, state: Mapping[str, np.ndarray]) -> list[str]:
    """Problems with ``state`` as weights for ``head`` (empty when it fits)."""
    expected = {k: v.shape for k, v in head.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing key(s) {missing}")
    if extra:
        problems.append(f"unexpected key(s) {extra}")
    for key in sorted(set(expected) & set(state)):
        arr = np.asarray(state[key])
        if arr.shape != tuple(expected[key]):
            problems.append(f"{key}: shape {arr.shape}, expected {tuple(expected[key])}")
        elif arr.dtype != np.float32:
            problems.append(f"{key}: dtype {arr.dtype}, expected float32")
        elif not np.all(np.isfinite(arr)):
            problems.append(f"{key}: contains NaN or Inf")
    return problems


def load_head_state(head: RankerHead, state: Mapping[str, np.ndarray]) -> None:
    """Load weights into ``head``; :class:`ModelStateError` lists every problem."""
    problems = check_state(head, state)
    if problems:
        raise ModelStateError("model weights rejected: " + "; ".join(problems))
    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


def head_state(head: RankerHead) -> dict[str, np.ndarray]:
    """The head's weights as float32 numpy arrays."""
    return {k: v.detach().numpy().astype(np.float32).copy() for k, v in head.state_dict().items()}


def shrink_state(
    arrays: Mapping[str, np.ndarray], alpha: float, config: HeadConfig
) -> dict[str, np.ndarray]:
    """The served model: the head's arrays moved ``alpha`` of the way from their zero-shot
    start (:func:`shared_model.ranker.shrink_toward_init`); other arrays (memorised evidence)
    pass through unchanged. ``alpha = 1`` returns the arrays as they are.

    A public, data-independent post-processing of the global weights (no DP cost): the
    server applies it to what it evaluates and releases, never to what the nodes train.
    """
    if alpha == 1.0:
        return dict(arrays)
    head = RankerHead(config)
    keys = set(head.state_dict())
    load_head_state(head, {k: v for k, v in arrays.items() if k in keys})
    out = dict(arrays)
    out.update(head_state(shrink_toward_init(head, alpha)))
    return out
