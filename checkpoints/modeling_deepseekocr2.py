"""DeepSeek-OCR 2: the first model's decoder, generation and grounding, with DeepEncoder V2 as its eyes.

What differs from DeepSeek-OCR lives in `deepencoder2.py` (SAM ending at 896 channels, then a Qwen2-style
encoder reading SAM's tokens with learned queries under a prefix-LM mask, then a linear projector) and
`processing_deepseekocr2.py` (a 1024 global view plus 2 to 6 tiles of 768, and no newline tokens). The
rest is the first model's: `DeepseekOCR2ForCausalLM` is a `DeepseekOCRForCausalLM` whose inner model
encodes and lays out images its own way, so `generate_tokens`, `forward_paged`, `prepare_inputs`, `ocr`
and `infer` behave as the first model's do. The class names are those the official `auto_map` names, and
the official weights load unchanged.
"""

import math
from typing import Optional, Sequence

import torch
from PIL import Image
from torch import nn

from .deepencoder import LinearProjector, SamEncoder
from .deepencoder2 import QueryEncoder, encode_views, vision_settings
from .modeling_deepseekocr import DeepseekOCRConfig, DeepseekOCRForCausalLM, ImagePromptMixin
from .modeling_deepseekv2 import DeepseekV2Model
from . import processing_deepseekocr2
from .processing_deepseekocr2 import BASE_SIZE, TILE_SIZE, ImageViews, PromptInputs, build_prompt_inputs

DEFAULT_VISION_CONFIG = {
    "image_size": 1024,
    "width": {
        "qwen2-0-5b": {"dim": 896},
        "sam_vit_b": {"downsample_channels": [512, 896], "global_attn_indexes": [2, 5, 8, 11],
                      "heads": 12, "layers": 12, "width": 768},
    },
}


class DeepseekOCR2Config(DeepseekOCRConfig):
    model_type = "deepseek_vl_v2"  # what the official config.json says

    def __init__(self, vision_config=None, projector_config=None, **kwargs):
        hidden_size = kwargs.get("hidden_size", 1280)
        vision_config = vision_config or DEFAULT_VISION_CONFIG
        encoder_width = vision_settings(vision_config)[1].width
        projector_config = projector_config or {
            "projector_type": "linear", "input_dim": encoder_width, "n_embed": hidden_size,
        }
        super().__init__(vision_config=vision_config, projector_config=projector_config, **kwargs)


class DeepseekOCR2Model(ImagePromptMixin, DeepseekV2Model):
    config_class = DeepseekOCR2Config

    def __init__(self, config: DeepseekOCR2Config):
        super().__init__(config)
        sam, encoder = vision_settings(config.vision_config)
        self.sam_model = SamEncoder(sam)
        self.sam_model.use_relative_positions(getattr(config, "sam_relative_positions", "folded"))
        self.qwen2_model = QueryEncoder(encoder)
        self.projector = LinearProjector(config.projector_config)
        self.view_seperator = nn.Parameter(torch.zeros(config.projector_config["n_embed"]))  # the checkpoint's spelling
        self.post_init()

    def encode_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """Square views of one size [N, 3, S, S], S 768 or 1024 (any number, from any pages) →
        query features [N, (S/64)², D], under bf16 autocast on CUDA as the original's `infer()` runs them."""
        return self.run_vision_towers(
            lambda views: encode_views(self.sam_model, self.qwen2_model, self.projector, views), pixels)

    def compiled_vision_parts(self) -> list:
        """What `ocr_service.vision_compile` compiles: the towers' blocks that repeat with one structure (SAM's
        blocks, the query encoder's layers) and SAM's neck (`DeepseekOCRModel.compiled_vision_parts`)."""
        return [*self.sam_model.blocks, *self.qwen2_model.model.model.layers, self.sam_model.neck]

    def arrange_image(self, views: ImageViews, global_features: torch.Tensor,
                      tile_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """An image's view features → the embeddings of its `<image>` positions [views.num_tokens, D]:
        each tile's queries in tile order (row-major), then the global view's, then the view separator."""
        parts = [tile_features.reshape(-1, tile_features.shape[-1])] if views.has_tiles else []
        parts += [global_features, self.view_seperator[None]]
        return torch.cat(parts, dim=0)


class DeepseekOCR2ForCausalLM(DeepseekOCRForCausalLM):
    config_class = DeepseekOCR2Config
    model_class = DeepseekOCR2Model
    processing = processing_deepseekocr2
    _no_split_modules = ["DeepseekV2DecoderLayer", "SamBlock", "QueryEncoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DeepseekOCR2Model):
            nn.init.normal_(module.view_seperator, std=1 / math.sqrt(module.view_seperator.shape[0]))

    def prepare_inputs(self, tokenizer, prompt: str, images: Sequence[Image.Image], base_size: int = BASE_SIZE,
                       image_size: int = TILE_SIZE, crop_mode: bool = True, raw_pixels: bool = False) -> PromptInputs:
        """As the first model's, with this model's views."""
        return build_prompt_inputs(tokenizer, prompt, images, base_size, image_size, crop_mode, raw_pixels=raw_pixels)

    def infer(self, tokenizer, prompt: str = "", image_file: str = "", output_path: str = "",
              base_size: int = BASE_SIZE, image_size: int = TILE_SIZE, crop_mode: bool = True,
              test_compress: bool = False, save_results: bool = False, eval_mode: bool = False,
              **generation_kwargs) -> str:
        """The original remote code's entry point (see the first model's `infer`), with this model's views."""
        return super().infer(tokenizer, prompt, image_file, output_path, base_size, image_size, crop_mode,
                             test_compress, save_results, eval_mode, **generation_kwargs)
