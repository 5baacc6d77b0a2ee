"""From page images to prompt embeddings: preprocessing on a bounded CPU pool, and the vision encoder
run on the views of many pages (of many predictions) at once.

Preprocessing (resizing, padding, tiling, tokenising) is CPU work done in worker threads. Its torch
operations would each spread over every core by default, so N workers would run N × cores threads:
on a GPU host the pool's workers get one intra-op thread each (`limit_cpu_threads`), and the pool's
size is what bounds the CPU work.

Encoding groups the views by size (the global views of one preset, the tiles) and runs each group
through SAM/CLIP/projector in passes bounded by pixels (SAM's global attention holds a bias of
(side/16)⁴ values per head and view, so a pass of four 1024-pixel views is already large).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from checkpoints.processing_deepseekocr import PromptInputs, build_prompt_inputs

# Pixels of views encoded in one pass: four 1024×1024 views, or ten 640×640 tiles.
PASS_PIXELS = 4 * 1024 * 1024


def limit_cpu_threads(workers: int) -> None:
    """Keep preprocessing workers × intra-op threads within the cores (GPU hosts: the model is not on the CPU)."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(workers, 1)))


class Preprocessor:
    """A bounded pool that turns (image, prompt, preset) into PromptInputs (views and token ids)."""

    def __init__(self, tokenizer, workers: int):
        self.tokenizer = tokenizer
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="deepseek-ocr-preprocess")

    def submit(self, image, prompt: str, resolution):
        return self.pool.submit(build_prompt_inputs, self.tokenizer, prompt, [image], resolution.base_size,
                                resolution.image_size, resolution.crop_mode)


@torch.inference_mode()
def encode_prompts(model, prompts: Sequence[PromptInputs], pass_pixels: int = PASS_PIXELS) -> list:
    """Prompt embeddings [T, D] for each prompt, its images encoded together with the other prompts' views."""
    inner = model.model
    device, dtype = inner.image_newline.device, inner.image_newline.dtype
    # (size → list of (key, views [n, 3, S, S])); key = (prompt index, image index, "global" | "tiles")
    groups: dict = {}
    for p, prompt in enumerate(prompts):
        for i, views in enumerate(prompt.images):
            groups.setdefault(views.global_view.shape[-1], []).append(((p, i, "global"), views.global_view[None]))
            if views.has_tiles:
                groups.setdefault(views.tiles.shape[-1], []).append(((p, i, "tiles"), views.tiles))
    features = {}
    for size, members in groups.items():
        pixels = torch.cat([v for _, v in members])
        per_pass = max(1, pass_pixels // (size * size))
        encoded = torch.cat([inner.encode_views(pixels[start:start + per_pass])
                             for start in range(0, pixels.shape[0], per_pass)])
        start = 0
        for key, views in members:
            features[key] = encoded[start:start + views.shape[0]]
            start += views.shape[0]
    embeddings = []
    for p, prompt in enumerate(prompts):
        embeds = inner.embed_tokens(prompt.input_ids.to(device))
        if prompt.images:
            arranged = [inner.arrange_image(views, features[(p, i, "global")][0], features.get((p, i, "tiles")))
                        for i, views in enumerate(prompt.images)]
            embeds[prompt.image_mask.to(device)] = torch.cat(arranged).to(dtype)
        embeddings.append(embeds)
    return embeddings
