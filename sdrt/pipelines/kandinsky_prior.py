"""Kandinsky 2.2's prior stage: prompt -> CLIP image embeddings, as diffusers ``KandinskyV22PriorPipeline``.

``CLIPTextModelWithProjection`` on the prompts, ``PriorTransformer`` denoising the image embedding with the
``UnCLIPScheduler`` and classifier-free guidance (``sdrt.guidance``, batch [uncond; cond]) in the shared loop,
then ``PriorTransformer.post_process_latents`` (``latents * clip_std + clip_mean``). As diffusers: a negative
prompt is appended to the prompts (its own unconditional prompt being itself) and its embedding becomes the
decoder's negative; without one the negative is ``get_zero_embed`` (the image encoder of a black image, a
constant of the artifact). Draws in diffusers' order: latents (rows, D), then one (rows, D) per step with t > 0.
"""

from __future__ import annotations

import numpy as np

from sdrt import schedulers
from sdrt.arrays import check_finite, to_host
from sdrt.errors import InputError
from sdrt.guidance import guide, uses_cfg
from sdrt.pipelines.loop import denoise
from sdrt.rng import GeneratorList
from sdrt.specs_kandinsky import (ATTENTION_MASK, CLIP_MEAN, CLIP_STD, ENCODER_HIDDEN_STATES, HIDDEN_STATES,
                                  INPUT_IDS, LAST_HIDDEN_STATE, NEGATIVE_IMAGE_EMBEDS, PREDICTED_IMAGE_EMBEDDING,
                                  PRIOR, PRIOR_SCHEDULER_KEY, PRIOR_TEXT_ENCODER, PROJ_EMBEDDING, TEXT_EMBEDS,
                                  TIMESTEP)


class PromptPairs:
    """Per-image seeds with a negative prompt. The prior's rows are [prompt x B; negative x B]; a batch-1 run
    with seed s draws (2, D) from s's generator (prompt row, then negative row), so row k and row B + k take
    generator k's draw of (2, D): image k equals a batch-1 run with seed k, as for every other draw."""

    def __init__(self, generators: GeneratorList):
        self.generators = generators

    def randn(self, shape, dtype=np.float32) -> np.ndarray:
        n = len(self.generators.generators)
        if shape[0] != 2 * n:
            raise InputError(f"a prior draw of shape {tuple(shape)} does not match {n} per-image seeds")
        pairs = [g.randn((2,) + tuple(shape[1:]), dtype) for g in self.generators.generators]
        return np.concatenate([np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])])


def attention_mask(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """The CLIP tokenizer's attention mask (1 up to and including the first EOS, 0 on padding), int32."""
    first_eos = np.argmax(ids == eos_id, axis=1)
    return (np.arange(ids.shape[1])[None, :] <= first_eos[:, None]).astype(np.int32)


class PriorStage:
    """The prior of an opened Kandinsky 2.2 artifact; ``engine(name)`` opens its components."""

    def __init__(self, manifest, engine, tokenizer):
        self.manifest, self.engine, self.tokenizer = manifest, engine, tokenizer
        config = manifest.data.get(PRIOR_SCHEDULER_KEY)
        if not isinstance(config, dict):
            from sdrt.errors import ArtifactError

            raise ArtifactError(f"{manifest.root} has no {PRIOR_SCHEDULER_KEY} in its manifest; re-run `sdrt export`")
        self.scheduler_config = config
        self.clip_mean = manifest.constant(CLIP_MEAN)
        self.clip_std = manifest.constant(CLIP_STD)
        self.zero_embeds = manifest.constant(NEGATIVE_IMAGE_EMBEDS)

    def scheduler(self, steps: int):
        """The prior's scheduler (the artifact's UnCLIPScheduler config) with its timesteps set."""
        sched = schedulers.from_config(self.scheduler_config)
        try:
            sched.set_timesteps(steps)
        except InputError as exc:
            raise InputError(f"prior_steps: {exc}") from None
        return sched

    def _text(self, prompts: list[str], timings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with timings("tokenize"):
            ids = self.tokenizer(prompts)
            mask = attention_mask(ids, self.tokenizer.eos_id)
        encoder = self.engine(PRIOR_TEXT_ENCODER)  # opened outside the stage: its time is ``load``
        with timings("text_encoder"):
            out = encoder({INPUT_IDS: ids})
        embeds = check_finite(to_host(out[TEXT_EMBEDS]), "prior text embeddings")
        hidden = check_finite(to_host(out[LAST_HIDDEN_STATE]), "prior text hidden states")
        return embeds, hidden, mask

    def __call__(self, prompt: str, negative_prompt: str, batch: int, steps: int, guidance: float, generator,
                 timings, callback=None) -> tuple[np.ndarray, np.ndarray]:
        """(image_embeds, negative_image_embeds), each (batch, D) float32. ``negative_prompt`` "" means none
        (diffusers' ``negative_prompt=None``)."""
        cfg = uses_cfg(guidance)
        with_negative = bool(negative_prompt)
        texts = [prompt] + ([negative_prompt] if with_negative else [])
        cond = np.repeat(np.arange(len(texts)), batch)  # prompts repeat_interleave'd per image: [p x B; n x B]
        rows = len(cond)
        if cfg:  # unconditional prompt: the negative prompt (for every row) if given, else ""
            uncond_index = len(texts) - 1 if with_negative else len(texts)
            if not with_negative:
                texts.append("")
            index = np.concatenate([np.full(rows, uncond_index), cond])
        else:
            index = cond
        embeds, hidden, mask = self._text(texts, timings)
        feeds = {PROJ_EMBEDDING: embeds[index], ENCODER_HIDDEN_STATES: hidden[index], ATTENTION_MASK: mask[index]}
        if isinstance(generator, GeneratorList) and with_negative:
            generator = PromptPairs(generator)
        sched = self.scheduler(steps)
        latents = generator.randn((rows, embeds.shape[1])) * np.float32(sched.init_noise_sigma)
        prior = self.engine(PRIOR)
        samples = timings.samples

        def predict(i, t, x):
            feeds[HIDDEN_STATES] = np.concatenate([x, x]) if cfg else x
            feeds[TIMESTEP] = np.full(len(index), t, np.float32)
            with timings("prior"):
                out = to_host(prior(feeds)[PREDICTED_IMAGE_EMBEDDING])
            return guide(out, guidance) if cfg else out

        latents = denoise(np, latents, sched, sched.timesteps, generator, predict, timings, callback,
                          stage="prior latents")
        samples["prior_steps"] = samples.pop("step", [])
        latents = (latents * self.clip_std + self.clip_mean).astype(np.float32)
        if with_negative:
            return latents[:batch], latents[batch:]
        return latents, np.repeat(self.zero_embeds, batch, axis=0)
