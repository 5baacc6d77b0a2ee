"""DeepEncoder V2 on its own: the prefix-LM mask, what each output can see, batching across views, settings."""

import json

import pytest
import torch

from checkpoints.deepencoder2 import (QueryEncoder, QueryEncoderSettings, QueryEncoderStack, prefix_lm_mask,
                                      vision_settings)
from conftest import REFERENCE

SMALL = QueryEncoderSettings(width=32, layers=2, heads=4, kv_heads=2, intermediate_size=64)


def test_prefix_lm_mask():
    expected = torch.tensor([
        # image tokens 0..2 | queries 0..2
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(prefix_lm_mask(3), expected)


def test_the_mask_is_built_once_per_token_count():
    stack = QueryEncoderStack(SMALL)
    assert stack.mask(4, torch.device("cpu")) is stack.mask(4, torch.device("cpu"))
    assert stack.mask(9, torch.device("cpu")).shape == (18, 18)


def small_stack(seed: int = 0) -> QueryEncoderStack:
    torch.manual_seed(seed)
    stack = QueryEncoderStack(SMALL)
    with torch.no_grad():
        for parameter in stack.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if parameter.dim() == 1 else 0.0))
    return stack.eval()


@torch.inference_mode()
def test_each_output_sees_what_the_prefix_lm_mask_allows():
    stack, n = small_stack(), 5
    x = torch.randn(1, 2 * n, SMALL.width, generator=torch.Generator().manual_seed(1))
    base = stack(x, n)
    # A later query does not reach the image tokens or the earlier queries ...
    later = x.clone()
    later[0, n + 3] += 1.0
    changed = stack(later, n)
    assert torch.equal(changed[0, :n + 3], base[0, :n + 3])
    assert not torch.allclose(changed[0, n + 3:], base[0, n + 3:])
    # ... while any image token, even the last, reaches every output (the image part is bidirectional).
    image = x.clone()
    image[0, n - 1] += 1.0
    changed = stack(image, n)
    assert all(not torch.allclose(changed[0, i], base[0, i]) for i in range(2 * n))


@torch.inference_mode()
def test_views_batched_equal_views_one_by_one():
    torch.manual_seed(3)
    encoder = QueryEncoder(SMALL).eval()
    features = torch.randn(5, SMALL.width, 12, 12)  # five 768-pixel views: 144 tokens each
    together = encoder(features)
    alone = torch.cat([encoder(features[i:i + 1]) for i in range(5)])
    assert together.shape == (5, 144, SMALL.width)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_query_table_by_view_size():
    encoder = QueryEncoder(SMALL)
    assert encoder.queries_for(144) is encoder.query_768.weight
    assert encoder.queries_for(256) is encoder.query_1024.weight
    with pytest.raises(ValueError, match="768"):
        encoder.queries_for(100)  # a 640-pixel view


def test_official_config_ends_sam_at_the_encoder_width():
    config = json.loads((REFERENCE / "deepseek-ocr-2" / "config.json").read_text())
    sam, encoder = vision_settings(config["vision_config"])
    # The config still says [512, 1024]; the official code, and the checkpoint, end SAM at 896.
    assert config["vision_config"]["width"]["sam_vit_b"]["downsample_channels"] == [512, 1024]
    assert sam.downsample_channels == [512, 896]
    assert (encoder.width, encoder.layers, encoder.heads, encoder.kv_heads, encoder.intermediate_size) == \
        (896, 24, 14, 2, 4864)
    assert encoder.rope_theta == 1_000_000.0
