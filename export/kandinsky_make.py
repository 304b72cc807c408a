"""``sdrt make-model OUT --arch tiny-kandinsky22``: random-weight Kandinsky 2.2 folders, OUT/prior and OUT/decoder.

OUT/prior is a diffusers ``KandinskyV22PriorPipeline`` folder (CLIPTextModelWithProjection, CLIPTokenizer,
PriorTransformer, CLIPVisionModelWithProjection, CLIPImageProcessor, UnCLIPScheduler), OUT/decoder a
``KandinskyV22Pipeline`` (or ``KandinskyV22InpaintPipeline``) folder (UNet2DConditionModel, VQModel "movq",
DDPMScheduler): the two folders the model is published as. Configs are data in ``archs.py``. Weights are
torch's default init under fixed seeds (one per module), except the prior's ``clip_mean`` / ``clip_std``
and its positional / prd embeddings, which diffusers initializes to zeros (a zero ``clip_std`` would map
every prior output to ``clip_mean``): those get seeded random values so exports and parity tests see them.

The decoder UNet is conditioned like a trained epsilon model (``_condition_unet``): a random UNet's eps is
uncorrelated with its input, so the DDPM's x0 = (x - sqrt(1 - a) eps) / sqrt(a) grows the latents by up to
1 / sqrt(a) (std 1 -> 6 in 3 steps, -> 20 in 10) and float32 noise grows with them. A trained model predicts
eps ~ x at high noise; here a copy of x rides the skip connection from ``conv_in`` to ``conv_out`` and the random
branches are scaled down (not zeroed), so latents stay O(1) and outputs still depend on prompt, embeds and seed.
"""

from __future__ import annotations

from pathlib import Path

PRIOR_INDEX = {"_class_name": "KandinskyV22PriorPipeline", "image_encoder": ["transformers",
               "CLIPVisionModelWithProjection"], "image_processor": ["transformers", "CLIPImageProcessor"],
               "prior": ["diffusers", "PriorTransformer"], "scheduler": ["diffusers", "UnCLIPScheduler"],
               "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"]}
DECODER_INDEX = {"movq": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                 "unet": ["diffusers", "UNet2DConditionModel"]}


def write_kandinsky(root: Path, arch: dict, seed: int) -> None:
    """Write ``root/prior`` and ``root/decoder`` for one ``archs._kandinsky`` entry."""
    import diffusers

    from sdrt_export import make_model as mm

    version = {"_diffusers_version": diffusers.__version__}
    prior, decoder = arch["prior"], arch["decoder"]
    p = root / "prior"
    mm._write_text_encoder(p / "text_encoder", prior["text_encoder"], seed, "CLIPTextModelWithProjection")
    mm._write_tokenizer(p / "tokenizer")
    mm._write_tokenizer_config(p / "tokenizer", prior["tokenizer"])
    _write_image_encoder(p / "image_encoder", prior["image_encoder"], seed + 2, mm._save_weights)
    _write_prior(p / "prior", prior["prior"], seed + 1, mm._save_weights)
    mm._write_json(p / "image_processor" / "preprocessor_config.json", prior["image_processor"])
    mm._write_json(p / "scheduler" / "scheduler_config.json", {**prior["scheduler"], **version})
    mm._write_json(p / "model_index.json", {**PRIOR_INDEX, **version})

    d = root / "decoder"
    _write_unet(d / "unet", decoder["unet"], seed, mm._save_weights)
    mm._write_diffusers_model(d / "movq", diffusers.VQModel, decoder["movq"], seed + 3)
    scheduler = decoder["scheduler"]
    mm._write_json(d / "scheduler" / "scheduler_config.json", {**scheduler, **version})
    mm._write_json(d / "model_index.json", {**DECODER_INDEX, "_class_name": decoder["pipeline"],
                                            "scheduler": ["diffusers", scheduler["_class_name"]], **version})


def _write_image_encoder(folder: Path, config: dict, seed: int, save) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = transformers.CLIPVisionModelWithProjection
    model = cls(transformers.CLIPVisionConfig(**config, architectures=[cls.__name__]))
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save(model, folder / "model.safetensors")


def _write_prior(folder: Path, config: dict, seed: int, save) -> None:
    import torch
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    model = PriorTransformer(**config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.clip_mean.copy_(0.1 * torch.randn(model.clip_mean.shape, generator=generator))
        model.clip_std.copy_(1.0 + 0.1 * torch.randn(model.clip_std.shape, generator=generator).abs())
        model.positional_embedding.copy_(0.02 * torch.randn(model.positional_embedding.shape, generator=generator))
        if model.prd_embedding is not None:
            model.prd_embedding.copy_(0.02 * torch.randn(model.prd_embedding.shape, generator=generator))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save(model, folder / "diffusion_pytorch_model.safetensors")


def _write_unet(folder: Path, config: dict, seed: int, save) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config)
    _condition_unet(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save(model, folder / "diffusion_pytorch_model.safetensors")


def _condition_unet(model, gain: float = 4.0, branch: float = 0.1, out_scale: float = 0.15) -> None:
    """Add x's copy to latent channels 0..3 along conv_in -> the last up resnet's shortcut (which takes conv_in's
    output as its skip input) -> conv_norm_out -> conv_out (centre taps), and scale that resnet's main branch by
    ``branch`` and conv_out's random weights by ``out_scale``: eps ~ x + a small random, conditioned part."""
    import torch

    n = 4  # latent channels; an inpainting UNet's extra inputs (masked latents, mask) only feed the random part
    resnet = model.up_blocks[-1].resnets[-1]
    skip = resnet.conv_shortcut.in_channels - model.conv_in.out_channels  # cat([hidden, skip]): skip comes last
    small = 0.1  # conv_norm_out's scale on those channels: SiLU(0.1 z) ~ 0.05 z, near linear
    with torch.no_grad():
        eye = torch.eye(n)
        model.conv_in.weight[:n, :n, 1, 1] += gain * eye
        resnet.conv_shortcut.weight[:n, skip:skip + n, 0, 0] += gain * eye
        resnet.conv2.weight.mul_(branch)
        resnet.conv2.bias.mul_(branch)
        model.conv_norm_out.weight[:n] = small
        model.conv_norm_out.bias[:n].mul_(small)
        model.conv_out.weight.mul_(out_scale)
        model.conv_out.bias.mul_(out_scale)
        model.conv_out.weight[:n, :n, 1, 1] += eye / (small * 0.5)
