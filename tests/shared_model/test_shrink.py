"""shrink_toward_init: the head moved a fraction of the way back to its zero-shot start."""

from __future__ import annotations

import pytest
import torch

from shared_model.ranker import HeadConfig, RankerHead, score, shrink_toward_init


def _trained(hidden_dim: int = 0) -> RankerHead:
    torch.manual_seed(0)
    head = RankerHead(HeadConfig(num_features=4, hidden_dim=hidden_dim))  # golden: 4 features
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return head


def test_endpoints_and_blend_of_scores() -> None:
    head = _trained()
    feats = torch.randn(7, head.config.num_features, generator=torch.Generator().manual_seed(1))
    zero_shot = score(RankerHead(head.config), feats)
    torch.testing.assert_close(score(shrink_toward_init(head, 1.0), feats), score(head, feats))
    torch.testing.assert_close(score(shrink_toward_init(head, 0.0), feats), zero_shot)
    torch.testing.assert_close(zero_shot, feats[:, 0])  # zero-shot = cosine feature
    half = score(shrink_toward_init(head, 0.5), feats)
    torch.testing.assert_close(half, 0.5 * score(head, feats) + 0.5 * zero_shot)


def test_same_keys_shapes_and_input_untouched() -> None:
    head = _trained(hidden_dim=4)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    out = shrink_toward_init(head, 0.3)
    assert {k: v.shape for k, v in out.state_dict().items()} == {
        k: v.shape for k, v in before.items()
    }
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # Position tower is not shrunk; MLP output scaled, so α=0 is exactly zero-shot.
    torch.testing.assert_close(
        out.position_tower.logit.weight, head.position_tower.logit.weight
    )
    feats = torch.randn(5, head.config.num_features, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(score(shrink_toward_init(head, 0.0), feats), feats[:, 0])


def test_golden_weights() -> None:
    out = shrink_toward_init(_trained(), 0.25)
    got = out.relevance_tower.linear.weight.detach().ravel().tolist()
    assert got == pytest.approx(GOLDEN, abs=1e-6)


def test_rejects_alpha_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="alpha"):
        shrink_toward_init(RankerHead(), 1.5)


GOLDEN = [1.047907, 0.137496, -0.010961, 0.05192]


def test_shrink_state_passes_other_arrays_and_identity_at_one() -> None:
    import numpy as np

    from shared_model.state import head_state, shrink_state

    head = _trained()
    arrays = head_state(head)
    arrays["evidence/clicks"] = np.arange(3, dtype=np.float32)
    assert shrink_state(arrays, 1.0, head.config).keys() == arrays.keys()
    out = shrink_state(arrays, 0.0, head.config)
    np.testing.assert_array_equal(out["evidence/clicks"], arrays["evidence/clicks"])
    np.testing.assert_array_equal(
        out["relevance_tower.linear.weight"], np.array([[1, 0, 0, 0]], np.float32)
    )
    assert all(out[k].dtype == np.float32 and out[k].shape == v.shape for k, v in arrays.items())


def test_run_settings_head_shrink_validated() -> None:
    from shared_model.settings import RunSettings

    assert RunSettings().head_shrink == 1.0
    assert RunSettings.from_config({"head-shrink": 0.5}).head_shrink == 0.5
    with pytest.raises(ValueError, match="head-shrink"):
        RunSettings.from_config({"head-shrink": 1.5})
