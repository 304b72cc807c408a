"""Component I/O specs of Kandinsky 2.2 (family ``kandinsky22``): the prior stage and the decoder stage.

diffusers' ``KandinskyV22CombinedPipeline`` = ``KandinskyV22PriorPipeline`` (CLIPTextModelWithProjection +
PriorTransformer + UnCLIPScheduler, CLIPVisionModelWithProjection for image prompts and the negative
embedding) then ``KandinskyV22Pipeline`` (UNet2DConditionModel with ``addition_embed_type="image"`` + MoVQ,
a VQModel decoded with ``force_not_quantize=True``). Same dataclasses as ``sdrt.specs``; ``sdrt.specs.build_specs``
hands a ``kandinsky22`` ModelDims to ``build_kandinsky_specs``.

Conventions the exporter and the runtime share (KRUN reads these names, KEXP writes them):
- prior text encoder: ``input_ids`` (int32, padded to 77) -> ``text_embeds`` (B, D, the projection) and
  ``last_hidden_state`` (B, 77, hidden). diffusers calls it without an attention mask; the mask (the
  tokenizer's, 1 = token, 0 = padding) goes to the prior instead.
- prior: ``hidden_states`` (B, D) latents, ``timestep`` (B,) float32 (the UnCLIP step's integer t),
  ``proj_embedding`` (B, D) = text_embeds, ``encoder_hidden_states`` (B, 77, hidden) = last_hidden_state,
  ``attention_mask`` (B, 77) int32 (cast to bool in the graph, as diffusers passes ``text_mask.bool()``)
  -> ``predicted_image_embedding`` (B, D). One call per step; CFG's batch is [uncond, cond]. With a negative
  prompt diffusers appends it to the prompts, so a call can hold 4x the image batch (``batch_factor`` 4).
- ``clip_mean`` / ``clip_std`` (PriorTransformer.post_process_latents: ``latents * clip_std + clip_mean``)
  are NOT in the prior graph: they apply once after the last step, not per step. They are constants in the
  artifact (``.npy`` files, shape (1, D), listed with sha256 in the manifest under ``constants``), as is
  ``negative_image_embeds`` (1, D): ``image_encoder(zeros(1, 3, S, S)).image_embeds``, diffusers'
  ``get_zero_embed``, the decoder's negative when no negative prompt is given. Load them with
  ``Manifest.constant(name)`` (float32 numpy arrays).
- image encoder: ``pixel_values`` (B, 3, S, S), CLIPImageProcessor-normalized -> ``image_embeds`` (B, D).
- decoder UNet (name ``unet``): ``sample`` (B, 4 | 9, h, w), ``timestep`` (B,) float32, ``image_embeds``
  (B, D) -> ``out_sample`` (B, 8, h, w): channels [:4] are eps (CFG applies to them), [4:] the learned
  variance (used only when the scheduler's variance_type is learned*). No encoder_hidden_states input:
  diffusers passes None, the UNet's image_proj builds its context from image_embeds.
- MoVQ decoder: ``latent`` (B, 4, h, w) unscaled (the Kandinsky pipelines apply no scaling factor) ->
  ``images`` (B, 3, H, W) in [-1, 1]; MoVQ encoder: ``images`` -> ``latents`` (``movq.encode(x).latents``).
- Manifest extras of the family: ``prior_scheduler`` (the UnCLIPScheduler config; ``scheduler`` is the
  decoder's), ``tokenizer`` (the prior's CLIP tokenizer), ``constants``, ``pipeline.prior_class_name`` and
  ``pipeline.decoder_class_name``.
"""

from __future__ import annotations

from sdrt.specs import BATCH, LATENT_HEIGHT, LATENT_WIDTH, HEIGHT, UNET, WIDTH, ComponentSpec, ModelDims, \
    ModelSpecs, TensorSpec

FAMILY = "kandinsky22"

PRIOR_TEXT_ENCODER = "prior_text_encoder"
PRIOR = "prior"
IMAGE_ENCODER = "image_encoder"
DECODER_UNET = UNET  # "unet": the decoder's UNet2DConditionModel
MOVQ_DECODER, MOVQ_ENCODER = "movq_decoder", "movq_encoder"
KANDINSKY_COMPONENTS = (PRIOR_TEXT_ENCODER, PRIOR, IMAGE_ENCODER, DECODER_UNET, MOVQ_DECODER, MOVQ_ENCODER)

# manifest["constants"][name] = {"path", "sha256", "size", "shape", "dtype"}
CONSTANTS_KEY = "constants"
NEGATIVE_IMAGE_EMBEDS, CLIP_MEAN, CLIP_STD = "negative_image_embeds", "clip_mean", "clip_std"
CONSTANTS = (NEGATIVE_IMAGE_EMBEDS, CLIP_MEAN, CLIP_STD)
PRIOR_SCHEDULER_KEY = "prior_scheduler"

# diffusers KandinskyV22CombinedPipeline.__call__ defaults (Img2Img combined: strength 0.3)
DEFAULT_PRIOR_STEPS, DEFAULT_PRIOR_GUIDANCE = 25, 4.0
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_IMG2IMG_STRENGTH = 100, 4.0, 0.3

# tensor names
INPUT_IDS, TEXT_EMBEDS, LAST_HIDDEN_STATE = "input_ids", "text_embeds", "last_hidden_state"
HIDDEN_STATES, TIMESTEP, PROJ_EMBEDDING = "hidden_states", "timestep", "proj_embedding"
ENCODER_HIDDEN_STATES, ATTENTION_MASK = "encoder_hidden_states", "attention_mask"
PREDICTED_IMAGE_EMBEDDING = "predicted_image_embedding"
PIXEL_VALUES, IMAGE_EMBEDS = "pixel_values", "image_embeds"
SAMPLE, OUT_SAMPLE, LATENT, IMAGES, LATENTS = "sample", "out_sample", "latent", "images", "latents"


def is_kandinsky(dims: ModelDims) -> bool:
    return dims.family == FAMILY


def build_kandinsky_specs(dims: ModelDims) -> ModelSpecs:
    """Every Kandinsky 2.2 component spec from the model's dimensions (see the module docstring)."""
    s, n, d = dims.vae_scale_factor, dims.text_max_length, dims.image_embed_dim
    if not d or not dims.unet_out_channels or not dims.image_encoder_size:
        raise ValueError("kandinsky22 dims need image_embed_dim, unet_out_channels and image_encoder_size")
    latent = (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    images = (BATCH, dims.image_channels, HEIGHT, WIDTH)
    f32 = "float32"
    text = ComponentSpec(
        PRIOR_TEXT_ENCODER, (TensorSpec(INPUT_IDS, "int32", (BATCH, n)),),
        (TensorSpec(TEXT_EMBEDS, f32, (BATCH, d)),
         TensorSpec(LAST_HIDDEN_STATE, f32, (BATCH, n, dims.text_hidden_size))),
        batch_factor=4, scale=s)
    prior = ComponentSpec(
        PRIOR,
        (TensorSpec(HIDDEN_STATES, f32, (BATCH, d)), TensorSpec(TIMESTEP, f32, (BATCH,)),
         TensorSpec(PROJ_EMBEDDING, f32, (BATCH, d)),
         TensorSpec(ENCODER_HIDDEN_STATES, f32, (BATCH, n, dims.text_hidden_size)),
         TensorSpec(ATTENTION_MASK, "int32", (BATCH, n))),
        (TensorSpec(PREDICTED_IMAGE_EMBEDDING, f32, (BATCH, d)),),
        batch_factor=4, scale=s)
    size = dims.image_encoder_size
    image_encoder = ComponentSpec(
        IMAGE_ENCODER, (TensorSpec(PIXEL_VALUES, f32, (BATCH, dims.image_channels, size, size)),),
        (TensorSpec(IMAGE_EMBEDS, f32, (BATCH, d)),), scale=s)
    unet = ComponentSpec(
        DECODER_UNET,
        (TensorSpec(SAMPLE, f32, (BATCH, dims.unet_in_channels, LATENT_HEIGHT, LATENT_WIDTH)),
         TensorSpec(TIMESTEP, f32, (BATCH,)), TensorSpec(IMAGE_EMBEDS, f32, (BATCH, d))),
        (TensorSpec(OUT_SAMPLE, f32, (BATCH, dims.unet_out_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        batch_factor=2, scale=s)
    decoder = ComponentSpec(MOVQ_DECODER, (TensorSpec(LATENT, f32, latent),), (TensorSpec(IMAGES, f32, images),),
                            scale=s)
    encoder = ComponentSpec(MOVQ_ENCODER, (TensorSpec(IMAGES, f32, images),), (TensorSpec(LATENTS, f32, latent),),
                            scale=s)
    return ModelSpecs(dims, {c.name: c for c in (text, prior, image_encoder, unet, decoder, encoder)})
