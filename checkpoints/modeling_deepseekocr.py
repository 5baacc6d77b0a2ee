"""DeepSeek-OCR: DeepEncoder features placed into a DeepSeek-V2 MoE decoder's prompt.

Entry points:
- `DeepseekOCRForCausalLM.infer(tokenizer, prompt, image_file, output_path, ...)`: the call users of
  the original remote code know, with the same arguments; it returns the text.
- `prepare_inputs` then `generate_tokens`: one prompt decoded with a growing cache, the readable
  reference path (the service's `DEEPSEEK_OCR_ENGINE=reference`).
- `DeepseekOCRModel.encode_views` and `arrange_image`, then `DeepseekOCRForCausalLM.forward_paged`: what
  the service's batched engine calls (vision passes across pages, then packed prefill and decode steps
  over a paged cache).
"""

import logging
import math
import os
import sys
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image, ImageOps
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_deepseek_v2 import DeepseekV2Config
from .conversation import format_prompt
from .deepencoder import (
    ClipVisionModel, LinearProjector, SamEncoder, check_relative_position_mode, encode_views, vision_settings,
)
from .generation import (
    DEFAULT_LOOP_STOP, ORIGINAL_EVAL_NO_REPEAT_RULE, ORIGINAL_NO_REPEAT_RULE, SERVING_NO_REPEAT_RULE, STOP_EOS,
    STOP_MAX_NEW_TOKENS, STOP_REPETITION, LoopDetector, LoopStopRule, NoRepeatNGramGuard, NoRepeatNGramRule,
    pick_next_token,
)
from .grounding import EOS_TEXT, crop_figures, draw_regions, parse_regions, to_markdown
from .modeling_deepseekv2 import DeepseekV2Model, DeepseekV2PreTrainedModel, KVCache
from .paged_attention import PagedKVCache
from . import processing_deepseekocr
from .processing_deepseekocr import ImageViews, PromptInputs, build_prompt_inputs

logger = logging.getLogger(__name__)

DEFAULT_VISION_CONFIG = {
    "image_size": 1024,
    "width": {
        "clip-l-14-224": {"heads": 16, "image_size": 224, "layers": 24, "patch_size": 14, "width": 1024},
        "sam_vit_b": {"downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11],
                      "heads": 12, "layers": 12, "width": 768},
    },
}


class DeepseekOCRConfig(DeepseekV2Config):
    model_type = "deepseek_vl_v2"

    def __init__(self, vision_config=None, projector_config=None, sam_relative_positions="folded", **kwargs):
        super().__init__(**kwargs)
        self.vision_config = vision_config or DEFAULT_VISION_CONFIG
        # "folded": SAM's relative positions go into its attention kernel (deepencoder.folded_relative_attention);
        # "materialised": a dense bias, the original's order of operations, bit-identical to it on the GPU.
        check_relative_position_mode(sam_relative_positions)
        self.sam_relative_positions = sam_relative_positions
        self.projector_config = projector_config or {
            "projector_type": "linear", "input_dim": 2048, "n_embed": self.hidden_size,
        }


class ImagePromptMixin:
    """Prompt embeddings with the images in place, for a model whose `encode_views(pixels)` encodes views
    of one size and whose `arrange_image(views, global_features, tile_features)` lays out an image's
    features for its `<image>` positions (both models share this, and their `view_seperator`)."""

    @property
    def vision_device(self) -> torch.device:
        return self.view_seperator.device

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.view_seperator.dtype

    def run_vision_towers(self, towers, pixels: torch.Tensor) -> torch.Tensor:
        """`towers(pixels)` on the views, in the model's device and dtype. On CUDA in bf16 under bf16 autocast,
        as the originals' `infer()` runs their towers: layer norms then return float32, so residual streams
        that follow one stay in float32 instead of being rounded to bf16 at every block."""
        device, dtype = self.vision_device, self.vision_dtype
        pixels = pixels.to(device=device, dtype=dtype)
        autocast = device.type == "cuda" and dtype == torch.bfloat16
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            features = towers(pixels)
        return features.to(dtype)

    def embed_image(self, views: ImageViews) -> torch.Tensor:
        """One image's `<image>` embeddings [views.num_tokens, D] (its views encoded on their own)."""
        tiles = self.encode_views(views.tiles) if views.has_tiles else None
        return self.arrange_image(views, self.encode_views(views.global_view[None])[0], tiles)

    def embed_prompt(self, input_ids: torch.Tensor, image_mask: Optional[torch.Tensor] = None,
                     images: Optional[Sequence[Sequence[ImageViews]]] = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with each row's `<image>` positions replaced by its images'."""
        embeds = self.embed_tokens(input_ids)
        if images is None:
            return embeds
        for row, row_images in enumerate(images):
            if not row_images:
                continue
            features = torch.cat([self.embed_image(v) for v in row_images], dim=0).to(embeds.dtype)
            positions = image_mask[row].nonzero().squeeze(-1)
            if positions.numel() != features.shape[0]:
                raise ValueError(f"{positions.numel()} image positions in the prompt for {features.shape[0]} features")
            embeds[row, positions] = features
        return embeds


class DeepseekOCRModel(ImagePromptMixin, DeepseekV2Model):
    config_class = DeepseekOCRConfig

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__(config)
        sam, clip = vision_settings(config.vision_config)
        self.sam_model = SamEncoder(sam)
        self.sam_model.use_relative_positions(getattr(config, "sam_relative_positions", "folded"))
        self.vision_model = ClipVisionModel(clip)
        self.projector = LinearProjector(config.projector_config)
        n_embed = config.projector_config["n_embed"]
        self.image_newline = nn.Parameter(torch.zeros(n_embed))
        self.view_seperator = nn.Parameter(torch.zeros(n_embed))  # the checkpoint's spelling
        self.post_init()

    def encode_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """Square views of one size [N, 3, S, S] (any number, from any pages) → features [N, (S/64)², D].
        Under bf16 autocast on CUDA (`run_vision_towers`), CLIP's residual stream and SAM's neck stay in
        float32 until the projector, as in the original."""
        return self.run_vision_towers(
            lambda views: encode_views(self.sam_model, self.vision_model, self.projector, views), pixels)

    def compiled_vision_parts(self) -> list:
        """What `ocr_service.vision_compile` compiles: the towers' blocks that repeat with one structure (SAM's
        blocks, CLIP-L's layers; nearly all of the vision pass's work, compiled once per kind and reused) and
        SAM's neck (whose LayerNorm2d, eager, ran as a dozen float32 kernels under autocast)."""
        return [*self.sam_model.blocks, *self.vision_model.transformer.layers, self.sam_model.neck]

    def _with_row_ends(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, D] feature grid → [rows·(cols + 1), D], each row closed by the newline vector."""
        rows, _, dim = grid.shape
        newline = self.image_newline.view(1, 1, dim).expand(rows, 1, dim)
        return torch.cat([grid, newline], dim=1).reshape(-1, dim)

    def arrange_image(self, views: ImageViews, global_features: torch.Tensor,
                      tile_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """An image's view features → the embeddings that fill its `<image>` positions: [views.num_tokens, D].

        Order: the tiles stitched into one grid (row by row), then the global view, then the
        view separator; without tiles, the global view and the separator. Every grid row ends with
        the newline vector.
        """
        parts = []
        if views.has_tiles:
            cols, rows = views.grid
            side = math.isqrt(tile_features.shape[1])
            stitched = tile_features.view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4)
            parts.append(self._with_row_ends(stitched.reshape(rows * side, cols * side, -1)))
        side = math.isqrt(global_features.shape[0])
        parts.append(self._with_row_ends(global_features.view(side, side, -1)))
        parts.append(self.view_seperator[None])
        return torch.cat(parts, dim=0)

class DeepseekOCRForCausalLM(DeepseekV2PreTrainedModel):
    config_class = DeepseekOCRConfig
    model_class = DeepseekOCRModel  # the vision side and the decoder; DeepSeek-OCR 2 names its own
    processing = processing_deepseekocr  # views, tiling and token layout (TILING_THRESHOLD, choose_tile_grid, ...)
    _no_split_modules = ["DeepseekV2DecoderLayer", "SamBlock", "ClipLayer"]

    def __init__(self, config: DeepseekOCRConfig):
        super().__init__(config)
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DeepseekOCRModel):
            std = 1 / math.sqrt(module.image_newline.shape[0])
            nn.init.normal_(module.image_newline, std=std)
            nn.init.normal_(module.view_seperator, std=std)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        images: Optional[Sequence[Sequence[ImageViews]]] = None,
        image_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[KVCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`images[b]` lists the ImageViews of batch row b (see `prepare_inputs`)."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_prompt(input_ids, image_mask, images)
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.num_hidden_layers)
        hidden = self.model.decode(inputs_embeds, position_ids, past_key_values, attention_mask)
        logits = self.lm_head(hidden).float()
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)

    def forward_paged(self, inputs_embeds: torch.Tensor, cache: PagedKVCache,
                      logits_at: Optional[torch.Tensor] = None, float_logits: bool = True) -> torch.Tensor:
        """Packed tokens [T, D] through the decoder over a paged cache (`cache.batch` names their positions
        and slots) → float32 logits at the token indices `logits_at` [B] (every token if None); in the
        model's dtype without `float_logits` (a greedy choice: the widening is exact, so it picks the same
        token, and at 128 rows it is 66 MB to write and read again every step)."""
        hidden = self.model.decode(inputs_embeds, cache=cache)
        if logits_at is not None:
            hidden = hidden[logits_at]
        logits = self.lm_head(hidden)
        return logits.float() if float_logits else logits

    # ------------------------------------------------------------------ inference

    def count_image_tokens(self, width: int, height: int, base_size: int, image_size: int, crop_mode: bool) -> int:
        """`<image>` tokens an image of this size takes under a preset, without building its views."""
        processing = self.processing
        grid = (1, 1)
        if crop_mode and (width > processing.TILING_THRESHOLD or height > processing.TILING_THRESHOLD):
            grid = processing.choose_tile_grid(width, height, image_size)
        return processing.image_token_count(base_size, image_size, crop_mode, grid)

    def prepare_inputs(self, tokenizer, prompt: str, images: Sequence[Image.Image], base_size: int = 1024,
                       image_size: int = 640, crop_mode: bool = True, raw_pixels: bool = False) -> PromptInputs:
        """The prompt's token ids and its images' views; `raw_pixels`: the views as uint8 pixels, which the
        caller normalises where it likes (the serving engine does on the GPU: `normalise_by_table`)."""
        return build_prompt_inputs(tokenizer, prompt, images, base_size, image_size, crop_mode, raw_pixels=raw_pixels)

    @torch.inference_mode()
    def generate_tokens(
        self,
        inputs: PromptInputs,
        max_new_tokens: int = 8192,
        repetition: Union[NoRepeatNGramRule, int] = SERVING_NO_REPEAT_RULE,
        loops: Optional[LoopStopRule] = DEFAULT_LOOP_STOP,
        eos_token_id: int = 1,
        temperature: float = 0.0,
        on_token: Optional[Callable[[int], None]] = None,
    ) -> tuple[list, str]:
        """Greedy (or sampled, with temperature > 0) decoding with a KV cache, for one prompt.

        `repetition`: the no-repeat n-gram rule (DeepSeek's serving rule by default; an int n is the
        original's whole-sequence rule of n-grams, 0 none). `loops`: stop when the output has become one
        block repeated (None: never); the tokens are then cut where the loop began, plus one copy.
        Returns the generated ids (EOS excluded) and why generation stopped: "eos", "max_new_tokens" or
        "repetition".
        """
        device = self.lm_head.weight.device
        input_ids = inputs.input_ids.to(device)[None]
        embeds = self.model.embed_prompt(input_ids, inputs.image_mask.to(device)[None], [inputs.images])
        cache = KVCache(self.config.num_hidden_layers)
        guard = NoRepeatNGramGuard(repetition, inputs.input_ids.tolist())
        detector = LoopDetector(loops) if loops is not None and loops.enabled else None
        hidden = self.model.decode(embeds, cache=cache)
        generated_tokens = []
        for _ in range(max_new_tokens):
            logits = self.lm_head(hidden[:, -1]).float()[0]
            token = pick_next_token(guard.mask_banned(logits), temperature)
            if token == eos_token_id:
                return generated_tokens, STOP_EOS
            generated_tokens.append(token)
            guard.append(token)
            if on_token is not None:
                on_token(token)
            if detector is not None and detector.append(token):
                return generated_tokens[:detector.keep_length], STOP_REPETITION
            step = torch.tensor([[token]], device=device)
            hidden = self.model.decode(self.model.embed_tokens(step), cache=cache)
        return generated_tokens, STOP_MAX_NEW_TOKENS

    def decode_text(self, tokenizer, token_ids: Sequence[int]) -> str:
        # Special tokens stay: <|ref|>/<|det|> carry the boxes and <td>/<tr> the tables.
        text = tokenizer.decode(list(token_ids), skip_special_tokens=False)
        if text.endswith(EOS_TEXT):
            text = text[: -len(EOS_TEXT)]
        return text.strip()

    def infer(self, tokenizer, prompt: str = "", image_file: str = "", output_path: str = "", base_size: int = 1024,
              image_size: int = 640, crop_mode: bool = True, test_compress: bool = False, save_results: bool = False,
              eval_mode: bool = False, **generation_kwargs) -> str:
        """The original remote code's entry point, returning the text instead of only printing it.

        eval_mode: no streaming and a 35-gram repeat guard (20 otherwise), as in the original: its
        whole-sequence rule, and no loop stop.
        save_results: writes result.mmd, result_with_boxes.jpg and images/N.jpg under output_path.
        generation_kwargs: max_new_tokens, repetition (a rule, or an int n-gram size), loops,
        temperature, eos_token_id.
        """
        if not prompt:
            raise ValueError("prompt is empty")
        if output_path:
            os.makedirs(os.path.join(output_path, "images"), exist_ok=True)
        prompt = format_prompt(prompt, "plain")
        images = [load_image(image_file)] if image_file else []
        inputs = self.prepare_inputs(tokenizer, prompt, images, base_size, image_size, crop_mode)
        options = {"max_new_tokens": 8192,
                   "repetition": ORIGINAL_EVAL_NO_REPEAT_RULE if eval_mode else ORIGINAL_NO_REPEAT_RULE,
                   "loops": None, "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 1}
        options.update(generation_kwargs)
        on_token = None if eval_mode else _stdout_streamer(tokenizer)
        ids, _ = self.generate_tokens(inputs, on_token=on_token, **options)
        if on_token is not None:
            sys.stdout.write("\n")
        text = self.decode_text(tokenizer, ids)
        if images and test_compress:
            text_tokens = len(tokenizer.encode(text, add_special_tokens=False))
            vision_tokens = int(inputs.image_mask.sum())
            logger.info("image %s: %d vision tokens, %d text tokens, compression %.2f",
                        images[0].size, vision_tokens, text_tokens, text_tokens / max(vision_tokens, 1))
        if images and save_results:
            if not output_path:
                raise ValueError("save_results needs an output_path")
            save_ocr_results(text, images[0], output_path)
        return text


def load_image(path: str) -> Image.Image:
    """Open an image file the way the model expects it: EXIF orientation applied, RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _stdout_streamer(tokenizer) -> Callable[[int], None]:
    """Print text as it is generated; tokens that end inside a multi-byte character wait for the rest."""
    pending = []

    def on_token(token: int) -> None:
        pending.append(token)
        text = tokenizer.decode(pending, skip_special_tokens=False)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text)
            sys.stdout.flush()
            pending.clear()

    return on_token


def save_ocr_results(text: str, image: Image.Image, output_path: str) -> None:
    """Write what the original writes: result.mmd, result_with_boxes.jpg and the cropped figures."""
    regions = parse_regions(text, image.size)
    for index, figure in enumerate(crop_figures(image, regions)):
        if figure is not None:
            figure.convert("RGB").save(os.path.join(output_path, "images", f"{index}.jpg"))
    with open(os.path.join(output_path, "result.mmd"), "w", encoding="utf-8") as handle:
        handle.write(to_markdown(text))
    draw_regions(image, regions).convert("RGB").save(os.path.join(output_path, "result_with_boxes.jpg"))
