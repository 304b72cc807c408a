"""What the UNet is conditioned on besides the latents: text embeddings, SDXL's pooled text embeds and
time ids, LCM's guidance embedding. Keyed on ``ModelDims``, not on family names.

Mirrors ``StableDiffusionPipeline.encode_prompt`` (one CLIP encoder, last hidden state),
``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids`` (two encoders' penultimate hidden
states concatenated, the second's projected pooled output, force_zeros_for_empty_prompt) and
``get_guidance_scale_embedding`` (used by ``StableDiffusionPipeline`` and
``LatentConsistencyModelPipeline`` when the UNet has ``time_cond_proj_dim``).
"""

from __future__ import annotations

import numpy as np

from sdrt.arrays import check_finite
from sdrt.specs import TEXT_ENCODER, TEXT_ENCODER_2, ModelDims


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of guidance strengths ``w`` (batch,) -> (batch, dim), float32 as diffusers'
    ``get_guidance_scale_embedding`` (VDM, Kingma et al. 2021; used by LCM, Luo et al. 2023, as w = s - 1)."""
    w = np.asarray(w, dtype=np.float32) * np.float32(1000.0)
    half = dim // 2
    step = np.log(np.float32(10000.0)).astype(np.float32) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    args = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def uses_text_cfg(dims: ModelDims, cfg_requested: bool) -> bool:
    """diffusers: no classifier-free guidance when guidance enters through ``timestep_cond`` (LCM UNets)."""
    return cfg_requested and not dims.time_cond_proj_dim


class TextConditioner:
    """Prompt (and negative prompt) -> the UNet's conditioning feeds, laid out [uncond x batch; cond x batch]."""

    def __init__(self, dims: ModelDims, tokenizers: list, engine, force_zeros_for_empty_prompt: bool = False):
        self.dims, self.tokenizers, self.engine = dims, tokenizers, engine
        self.force_zeros = force_zeros_for_empty_prompt

    def __call__(self, prompt: str, negative_prompt: str, batch: int, cfg: bool, width: int, height: int,
                 guidance: float, timings) -> dict:
        zero_negative = cfg and self.force_zeros and not negative_prompt
        prompts = [negative_prompt or "", prompt] if cfg and not zero_negative else [prompt]
        hidden, pooled = self._encode(prompts, timings)
        if zero_negative:
            hidden = np.concatenate([np.zeros_like(hidden), hidden])
            pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
        feeds = {"encoder_hidden_states": np.repeat(hidden, batch, axis=0)}
        rows = feeds["encoder_hidden_states"].shape[0]
        if self.dims.has_text_encoder_2:
            feeds["text_embeds"] = np.repeat(pooled, batch, axis=0)
            # (original size, crop top-left, target size), all from the requested size as diffusers' defaults
            time_ids = np.array([height, width, 0, 0, height, width], np.float32)
            feeds["time_ids"] = np.tile(time_ids, (rows, 1))
        if self.dims.time_cond_proj_dim:
            feeds["timestep_cond"] = guidance_embedding(np.full(rows, guidance - 1, np.float32),
                                                        self.dims.time_cond_proj_dim)
        return feeds

    def _encode(self, prompts: list[str], timings) -> tuple[np.ndarray, np.ndarray | None]:
        """(hidden states, pooled text embeds or None), one call per text encoder."""
        if not self.dims.has_text_encoder_2:
            with timings("tokenize"):
                ids = self.tokenizers[0](prompts)
            encoder = self.engine(TEXT_ENCODER)  # opened outside the stage: its time is ``load``
            with timings("text_encoder"):
                hidden = encoder({"input_ids": ids})["last_hidden_state"]
            return check_finite(hidden, "text embeddings"), None
        hiddens, pooled = [], None
        for tokenizer, name in zip(self.tokenizers, (TEXT_ENCODER, TEXT_ENCODER_2)):
            with timings("tokenize"):
                ids = tokenizer(prompts)
            encoder = self.engine(name)
            with timings("text_encoder"):
                out = encoder({"input_ids": ids})
            hiddens.append(check_finite(out["hidden_states"], f"{name} embeddings"))
            pooled = out.get("text_embeds", pooled)
        return np.concatenate(hiddens, axis=-1), check_finite(pooled, "pooled text embeddings")
