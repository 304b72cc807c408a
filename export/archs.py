"""Architectures for ``sdrt make-model`` as plain data: component configs, scheduler, tokenizers, pipeline.

Each entry of ``ARCHS`` names the diffusers pipeline class, the UNet / VAE / CLIP text encoder(s)
configs, the scheduler config and the tokenizer config(s), as the real model folders store them
(SD1.5, stabilityai/stable-diffusion-2-1{,-base}, sd-turbo, LCM_Dreamshaper_v7, SDXL base 1.0).
The ``tiny-*`` entries keep each family's structure at test size.
"""

from __future__ import annotations

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD15_VAE = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower. bos/eos/pad ids as in SD1.5's config (eos 2 = pool at argmax id).
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# OpenCLIP ViT-H/14's text tower as diffusers stores it for SD2: GELU, the last of 24 layers cut.
SD2_TEXT = {**SD15_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
            "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
SD2_UNET = {**SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True, "upcast_attention": True}
# OpenCLIP ViT-bigG/14 (SDXL's text_encoder_2, CLIPTextModelWithProjection)
SDXL_TEXT_2 = {**SD15_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
SDXL_UNET = {
    **SD15_UNET,
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids x 256
}

TINY_UNET = {**SD15_UNET, "sample_size": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [32, 64],
             "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8}
TINY_VAE = {**SD15_VAE, "sample_size": 64, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
            "norm_num_groups": 8}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
             "projection_dim": 32}
TINY_SD2_UNET = {**TINY_UNET, "attention_head_dim": [2, 4], "use_linear_projection": True, "upcast_attention": True}

_SCHEDULER_BASE = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SCHEDULER = {"_class_name": "PNDMScheduler", **_SCHEDULER_BASE}  # SD1.5
SD2_SCHEDULER = {"_class_name": "DDIMScheduler", **_SCHEDULER_BASE, "prediction_type": "v_prediction"}  # 2-1 (768-v)
SD2_BASE_SCHEDULER = {"_class_name": "PNDMScheduler", **_SCHEDULER_BASE, "prediction_type": "epsilon"}  # 2-1-base
# The Euler configs as stabilityai/stable-diffusion-xl-base-1.0 ships them (keys carried over from the PNDM
# config: skip_prk_steps, set_alpha_to_one, sample_max_value), and the same with trailing Euler a as
# stabilityai/sd-turbo and stabilityai/sdxl-turbo ship them (1-4 steps, guidance 0).
_EULER_BASE = {**_SCHEDULER_BASE, "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
               "use_karras_sigmas": False}
TURBO_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler", **_EULER_BASE, "timestep_spacing": "trailing"}
LCM_SCHEDULER = {"_class_name": "LCMScheduler", **{k: v for k, v in _SCHEDULER_BASE.items() if k != "skip_prk_steps"},
                 "set_alpha_to_one": True, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False,
                 "original_inference_steps": 50, "prediction_type": "epsilon", "timestep_scaling": 10.0,
                 "timestep_spacing": "leading"}
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", **_EULER_BASE, "timestep_spacing": "leading"}

TOKENIZER_CONFIG = {
    "bos_token": "<|startoftext|>",
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
OPENCLIP_TOKENIZER_CONFIG = {**TOKENIZER_CONFIG, "pad_token": "!"}  # SD2 and SDXL's tokenizer_2 pad with "!" (id 0)


def _sd(unet, vae, text, scheduler=SCHEDULER, tokenizer=TOKENIZER_CONFIG, pipeline="StableDiffusionPipeline"):
    return {"pipeline": pipeline, "unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler,
            "tokenizer": tokenizer}


def _sdxl(unet, vae, text, text_2, pipeline="StableDiffusionXLPipeline", scheduler=SDXL_SCHEDULER):
    return {**_sd(unet, vae, text, scheduler, pipeline=pipeline),
            "text_encoder_2": text_2, "tokenizer_2": OPENCLIP_TOKENIZER_CONFIG}


TINY_SDXL_UNET = {**TINY_SD2_UNET, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
                  "cross_attention_dim": 64, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 80, "upcast_attention": False}
TINY_SDXL_VAE = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
_TINY_SD2 = dict(unet=TINY_SD2_UNET, vae=TINY_VAE, text={**SD2_TEXT, **TINY_TEXT}, tokenizer=OPENCLIP_TOKENIZER_CONFIG)

# madebyollin/taesd's and madebyollin/taesdxl's config.json (diffusers AutoencoderTiny; both the same shape,
# SD1.x/2.x resp. SDXL latents): used as a pipeline's tiny VAE (``sdrt export --tiny-vae``), not a pipeline.
TAESD = {"in_channels": 3, "out_channels": 3, "encoder_block_out_channels": [64, 64, 64, 64],
         "decoder_block_out_channels": [64, 64, 64, 64], "act_fn": "relu", "latent_channels": 4,
         "upsampling_scaling_factor": 2, "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1],
         "latent_magnitude": 3, "latent_shift": 0.5, "force_upcast": False, "scaling_factor": 1.0}

# Kandinsky 2.2 (kandinsky-community/kandinsky-2-2-prior + kandinsky-2-2-decoder[-inpaint]): two pipeline folders.
# Real shapes: the prior's CLIP ViT-bigG/14 text and vision towers, PriorTransformer at D = 1280, the decoder UNet
# of diffusers' scripts/convert_kandinsky_to_diffusers.py with 2.2's image conditioning (addition_embed_type
# "image", image_proj from D) and its MOVQ_CONFIG. The hub's config files are not reachable here; sizes are
# from those sources, not checked byte for byte. Tiny: diffusers' kandinsky2_2 test dummies, MoVQ with four
# blocks (scale 8, as the real one) so latents stay small.
K22_PRIOR_TEXT = {**SDXL_TEXT_2}
K22_IMAGE_ENCODER = {"hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48, "num_attention_heads": 16,
                     "image_size": 224, "patch_size": 14, "projection_dim": 1280, "hidden_act": "gelu",
                     "layer_norm_eps": 1e-5, "num_channels": 3}
K22_PRIOR = {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 1280,
             "num_embeddings": 77, "additional_embeddings": 4}
K22_UNET = {"act_fn": "silu", "addition_embed_type": "image", "addition_embed_type_num_heads": 64,
            "attention_head_dim": 64, "block_out_channels": [384, 768, 1152, 1536], "cross_attention_dim": 768,
            "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                                 "SimpleCrossAttnDownBlock2D"],
            "encoder_hid_dim": 1280, "encoder_hid_dim_type": "image_proj", "in_channels": 4, "layers_per_block": 3,
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_num_groups": 32, "out_channels": 8,
            "resnet_time_scale_shift": "scale_shift", "sample_size": 64,
            "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                               "ResnetUpsampleBlock2D"]}
K22_MOVQ = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                                 "AttnDownEncoderBlock2D"],
            "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "num_vq_embeddings": 16384, "block_out_channels": [128, 256, 256, 512], "vq_embed_dim": 4,
            "layers_per_block": 2, "norm_type": "spatial"}
K22_PRIOR_SCHEDULER = {"_class_name": "UnCLIPScheduler", "clip_sample": True, "clip_sample_range": 20.0,
                       "num_train_timesteps": 1000, "prediction_type": "sample", "variance_type": "fixed_small_log"}
K22_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.012, "beta_schedule": "linear", "beta_start": 0.00085,
                 "clip_sample": False, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
                 "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
                 "steps_offset": 1, "thresholding": False, "timestep_spacing": "leading", "trained_betas": None,
                 "variance_type": "fixed_small"}
K22_IMAGE_PROCESSOR = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                       "do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type":
                       "CLIPImageProcessor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
                       "size": {"shortest_edge": 224}}
TINY_K22_TEXT = {**SD15_TEXT, "hidden_size": 32, "projection_dim": 32, "intermediate_size": 37,
                 "num_attention_heads": 4, "num_hidden_layers": 5}
TINY_K22_IMAGE_ENCODER = {**K22_IMAGE_ENCODER, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 5,
                          "num_attention_heads": 4, "projection_dim": 32}
TINY_K22_PRIOR = {"num_attention_heads": 2, "attention_head_dim": 12, "embedding_dim": 32, "num_layers": 1}
TINY_K22_UNET = {"in_channels": 4, "out_channels": 8, "addition_embed_type": "image",
                 "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
                 "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
                 "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "block_out_channels": [32, 64],
                 "layers_per_block": 1, "encoder_hid_dim": 32, "encoder_hid_dim_type": "image_proj",
                 "cross_attention_dim": 32, "attention_head_dim": 4, "resnet_time_scale_shift": "scale_shift",
                 "sample_size": 8}
TINY_K22_MOVQ = {**K22_MOVQ, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
                 "num_vq_embeddings": 12}


def _kandinsky(text, image_encoder, prior, unet, movq, prior_scheduler=K22_PRIOR_SCHEDULER,
               decoder="KandinskyV22Pipeline"):
    """A ``make-model`` entry writing OUT/prior (KandinskyV22PriorPipeline) and OUT/decoder (``decoder``)."""
    return {"kandinsky": {
        "prior": {"text_encoder": text, "image_encoder": image_encoder, "prior": prior, "scheduler": prior_scheduler,
                  "tokenizer": OPENCLIP_TOKENIZER_CONFIG, "image_processor": K22_IMAGE_PROCESSOR},
        "decoder": {"pipeline": decoder, "unet": unet, "movq": movq, "scheduler": K22_SCHEDULER}}}


_TINY_K22 = (TINY_K22_TEXT, TINY_K22_IMAGE_ENCODER, TINY_K22_PRIOR)
_TINY_K22_PRIOR_SCHEDULER = {**K22_PRIOR_SCHEDULER, "clip_sample_range": 10.0}  # diffusers' test dummy

ARCHS: dict[str, dict] = {
    "sd15": _sd(SD15_UNET, SD15_VAE, SD15_TEXT),
    "tiny": _sd(TINY_UNET, TINY_VAE, {**SD15_TEXT, **TINY_TEXT}),
    # SD1.5-inpainting: 9-channel UNet (latent + mask + masked-image latent)
    "tiny-inpaint": _sd({**TINY_UNET, "in_channels": 9}, TINY_VAE, {**SD15_TEXT, **TINY_TEXT},
                        pipeline="StableDiffusionInpaintPipeline"),
    "sd2": _sd(SD2_UNET, {**SD15_VAE, "sample_size": 768}, SD2_TEXT, SD2_SCHEDULER, OPENCLIP_TOKENIZER_CONFIG),
    "tiny-sd2": _sd(**_TINY_SD2, scheduler=SD2_SCHEDULER),
    "tiny-sd2-base": _sd(**_TINY_SD2, scheduler=SD2_BASE_SCHEDULER),
    "tiny-sd-turbo": _sd(**_TINY_SD2, scheduler=TURBO_SCHEDULER),
    # LCM-distilled SD1.5 UNet: guidance enters as an embedding of width time_cond_proj_dim
    "tiny-lcm": _sd({**TINY_UNET, "time_cond_proj_dim": 256}, TINY_VAE, {**SD15_TEXT, **TINY_TEXT}, LCM_SCHEDULER,
                    pipeline="LatentConsistencyModelPipeline"),
    "sdxl": _sdxl(SDXL_UNET, {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
                  SD15_TEXT, SDXL_TEXT_2),
    "tiny-sdxl": _sdxl(TINY_SDXL_UNET, TINY_SDXL_VAE, {**SD15_TEXT, **TINY_TEXT}, {**SDXL_TEXT_2, **TINY_TEXT}),
    # SDXL-Turbo: the SDXL layout with Euler a on trailing timesteps (1-4 steps, guidance 0)
    "tiny-sdxl-turbo": _sdxl(TINY_SDXL_UNET, TINY_SDXL_VAE, {**SD15_TEXT, **TINY_TEXT}, {**SDXL_TEXT_2, **TINY_TEXT},
                             scheduler=TURBO_SCHEDULER),
    # diffusers/stable-diffusion-xl-1.0-inpainting-0.1's layout: 9-channel UNet, StableDiffusionXLInpaintPipeline
    "tiny-sdxl-inpaint": _sdxl({**TINY_SDXL_UNET, "in_channels": 9}, TINY_SDXL_VAE, {**SD15_TEXT, **TINY_TEXT},
                               {**SDXL_TEXT_2, **TINY_TEXT}, pipeline="StableDiffusionXLInpaintPipeline"),
    "kandinsky22": _kandinsky(K22_PRIOR_TEXT, K22_IMAGE_ENCODER, K22_PRIOR, K22_UNET, K22_MOVQ),
    "tiny-kandinsky22": _kandinsky(*_TINY_K22, TINY_K22_UNET, TINY_K22_MOVQ, _TINY_K22_PRIOR_SCHEDULER),
    # kandinsky-2-2-decoder-inpaint's layout: 9-channel UNet [latents, masked-image latents, mask]
    "tiny-kandinsky22-inpaint": _kandinsky(*_TINY_K22, {**TINY_K22_UNET, "in_channels": 9}, TINY_K22_MOVQ,
                                           _TINY_K22_PRIOR_SCHEDULER, decoder="KandinskyV22InpaintPipeline"),
    "taesd": {"autoencoder_tiny": TAESD},
    "taesdxl": {"autoencoder_tiny": TAESD},
}
