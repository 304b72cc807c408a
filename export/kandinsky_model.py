"""Kandinsky 2.2 model folders: layout detection, ``ModelDims`` from the configs, torch wrappers per spec.

Two layouts are accepted (``sdrt export --model ...``): ``OUT`` holding ``prior/`` (a diffusers
``KandinskyV22PriorPipeline`` folder) and ``decoder/`` (a ``KandinskyV22Pipeline`` / ``...InpaintPipeline``
folder), as ``sdrt make-model --arch tiny-kandinsky22`` writes it; or the decoder folder with ``--prior
PRIOR_DIR``, the two repositories the model is published as. The wrappers' forward signatures are exactly the
specs of ``sdrt/specs_kandinsky.py`` (inputs in spec order, outputs as a tuple in spec order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrt.errors import ModelError
from sdrt.specs import ModelDims
from sdrt.specs_kandinsky import DECODER_UNET, FAMILY, IMAGE_ENCODER, MOVQ_DECODER, MOVQ_ENCODER, PRIOR, \
    PRIOR_TEXT_ENCODER
from sdrt_export.wrappers import read_json

PRIOR_PIPELINE = "KandinskyV22PriorPipeline"
# decoder pipeline -> the combined pipeline diffusers' AutoPipeline builds from it and its prior
COMBINED = {"KandinskyV22Pipeline": "KandinskyV22CombinedPipeline",
            "KandinskyV22Img2ImgPipeline": "KandinskyV22Img2ImgCombinedPipeline",
            "KandinskyV22InpaintPipeline": "KandinskyV22InpaintCombinedPipeline"}
PRIOR_SUBFOLDERS = ("text_encoder", "tokenizer", "prior", "image_encoder", "scheduler")
DECODER_SUBFOLDERS = ("unet", "movq", "scheduler")


@dataclass(frozen=True)
class Layout:
    """Where the two stages are; ``root`` is the folder holding both (None for --model DECODER --prior PRIOR)."""

    prior: Path
    decoder: Path
    root: Path | None = None

    @property
    def source(self) -> Path:
        return (self.root or self.decoder).absolute()

    def sha256(self) -> str:
        """One digest of both folders (each hashed as ``folders.hash_folder`` hashes a pipeline folder)."""
        from sdrt_export.folders import hash_folder

        text = "".join(f"{name}\0{hash_folder(path)}\n" for name, path in (("prior", self.prior),
                                                                           ("decoder", self.decoder)))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def decoder_class(self) -> str:
        return read_json(self.decoder / "model_index.json")["_class_name"]


def _class_of(path: Path) -> str | None:
    index = path / "model_index.json"
    return read_json(index).get("_class_name") if index.is_file() else None


def find_layout(model, prior=None) -> Layout | None:
    """The Kandinsky layout of ``model`` (+ ``prior``), None for any other folder (the SD exporter's);
    ``ModelError`` naming the fix for a Kandinsky folder that is incomplete or passed the wrong way."""
    path = Path(model).expanduser()
    if not path.is_dir():
        if prior is not None:
            raise ModelError(f"decoder folder {path} does not exist")
        return None
    cls = _class_of(path)
    if cls is None and ((path / "prior").is_dir() or (path / "decoder").is_dir()):
        if prior is not None:
            raise ModelError(f"{path} holds prior/ and decoder/; pass it alone as --model (without --prior)")
        missing = [f"{name}/model_index.json" for name in ("prior", "decoder") if not (path / name / "model_index.json")
                   .is_file()]
        if missing:
            raise ModelError(f"{path} is not a Kandinsky 2.2 folder pair (missing {', '.join(missing)}); expected "
                             "prior/ (KandinskyV22PriorPipeline) and decoder/ (KandinskyV22Pipeline)")
        return _checked(Layout(path / "prior", path / "decoder", path))
    if cls == PRIOR_PIPELINE:
        raise ModelError(f"{path} is a {PRIOR_PIPELINE} folder; pass the decoder as --model and this folder as --prior")
    if cls in COMBINED:
        if prior is None:
            raise ModelError(f"{path} is a {cls} (the Kandinsky 2.2 decoder); pass its prior with --prior PRIOR_DIR "
                             f"(a {PRIOR_PIPELINE} folder, e.g. kandinsky-community/kandinsky-2-2-prior)")
        prior_path = Path(prior).expanduser()
        if not prior_path.is_dir():
            raise ModelError(f"prior folder {prior_path} does not exist")
        return _checked(Layout(prior_path, path))
    if prior is not None:
        what = cls or "folder without model_index.json"
        raise ModelError(f"--prior is for Kandinsky 2.2 decoder folders; {path} is a {what}")
    return None


def _checked(layout: Layout) -> Layout:
    if _class_of(layout.prior) != PRIOR_PIPELINE:
        raise ModelError(f"{layout.prior} is not a {PRIOR_PIPELINE} folder (model_index.json _class_name "
                         f"{_class_of(layout.prior)!r})")
    if _class_of(layout.decoder) not in COMBINED:
        raise ModelError(f"{layout.decoder} is not a Kandinsky 2.2 decoder folder (model_index.json _class_name "
                         f"{_class_of(layout.decoder)!r}; supported: {', '.join(COMBINED)})")
    for folder, names in ((layout.prior, PRIOR_SUBFOLDERS), (layout.decoder, DECODER_SUBFOLDERS)):
        missing = [f"{name}/" for name in names if not (folder / name).is_dir()]
        if missing:
            raise ModelError(f"{folder} is incomplete (missing {', '.join(missing)})")
    return layout


def dims_from_layout(layout: Layout) -> ModelDims:
    """ModelDims of a Kandinsky 2.2 prior + decoder; ``ModelError`` listing every mismatch between them."""
    text = read_json(layout.prior / "text_encoder" / "config.json")
    image = read_json(layout.prior / "image_encoder" / "config.json")
    prior = read_json(layout.prior / "prior" / "config.json")
    unet = read_json(layout.decoder / "unet" / "config.json")
    movq = read_json(layout.decoder / "movq" / "config.json")
    image = image.get("vision_config", image)
    d = int(prior.get("embedding_dim", 768))
    latent = int(movq.get("latent_channels", 4))
    problems = []

    def expect(what: str, got, want) -> None:
        if got != want:
            problems.append(f"{what} {got} != {want}")

    for cfg, cls, where in ((text, "CLIPTextModelWithProjection", "prior text encoder"),
                            (image, "CLIPVisionModelWithProjection", "prior image encoder")):
        if cfg.get("architectures") and cls not in cfg["architectures"]:
            problems.append(f"{where} is a {cfg['architectures'][0]} (expected {cls})")
    expect("prior text encoder projection_dim", text.get("projection_dim", 512), prior.get("embedding_proj_dim") or d)
    expect("prior text encoder hidden_size", text.get("hidden_size", 512), d)
    expect("prior text encoder max_position_embeddings", text.get("max_position_embeddings", 77),
           prior.get("num_embeddings", 77))
    expect("prior clip_embed_dim", prior.get("clip_embed_dim") or d, d)
    expect("prior image encoder projection_dim", image.get("projection_dim", 512), d)
    expect("decoder UNet addition_embed_type", unet.get("addition_embed_type"), "image")
    expect("decoder UNet encoder_hid_dim_type", unet.get("encoder_hid_dim_type"), "image_proj")
    expect("decoder UNet encoder_hid_dim (the prior's embedding_dim)", unet.get("encoder_hid_dim"), d)
    expect("decoder UNet out_channels", unet.get("out_channels", 4), 2 * latent)
    if unet.get("in_channels", 4) not in (latent, 2 * latent + 1):
        problems.append(f"decoder UNet in_channels {unet.get('in_channels')} (expected {latent} or {2 * latent + 1})")
    if movq.get("_class_name", "VQModel") != "VQModel":
        problems.append(f"decoder movq is a {movq.get('_class_name')} (expected VQModel)")
    if problems:
        raise ModelError(f"prior {layout.prior} and decoder {layout.decoder} do not fit together or are not "
                         f"Kandinsky 2.2: {'; '.join(problems)}")
    return ModelDims(
        family=FAMILY, latent_channels=latent, unet_in_channels=int(unet.get("in_channels", 4)),
        text_max_length=int(text.get("max_position_embeddings", 77)), text_hidden_size=int(text.get("hidden_size")),
        cross_attention_dim=int(unet.get("cross_attention_dim", 1280)),
        vae_scale_factor=2 ** (len(movq.get("block_out_channels", [64])) - 1),
        image_channels=int(movq.get("in_channels", 3)), image_embed_dim=d,
        unet_out_channels=int(unet.get("out_channels")), image_encoder_size=int(image.get("image_size", 224)))


# --- wrappers (inputs and outputs exactly as sdrt/specs_kandinsky.py says) -----------------------------

class PriorTextEncoderWrapper(torch.nn.Module):
    """CLIPTextModelWithProjection: input_ids (int32) -> text_embeds, last_hidden_state (no attention mask,
    as KandinskyV22PriorPipeline._encode_prompt calls it)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids.to(torch.int64), return_dict=True)
        return out.text_embeds, out.last_hidden_state


class PriorWrapper(torch.nn.Module):
    """PriorTransformer.forward -> predicted_image_embedding; the int32 mask becomes the bool text_mask."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def forward(self, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask):
        return self.prior(hidden_states, timestep=timestep, proj_embedding=proj_embedding,
                          encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask.bool(),
                          return_dict=False)[0]


class ImageEncoderWrapper(torch.nn.Module):
    """CLIPVisionModelWithProjection: normalized pixel_values -> image_embeds."""

    def __init__(self, image_encoder):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixel_values):
        return self.image_encoder(pixel_values=pixel_values, return_dict=True).image_embeds


class DecoderUNetWrapper(torch.nn.Module):
    """UNet2DConditionModel with addition_embed_type="image": no text context, image_embeds conditioning."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, image_embeds):
        return self.unet(sample, timestep, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": image_embeds},
                         return_dict=False)[0]


class MovqDecoderWrapper(torch.nn.Module):
    """VQModel.decode(latent, force_not_quantize=True).sample, as KandinskyV22Pipeline decodes."""

    def __init__(self, movq):
        super().__init__()
        self.movq = movq

    def forward(self, latent):
        return self.movq.decode(latent, force_not_quantize=True, return_dict=False)[0]


class MovqEncoderWrapper(torch.nn.Module):
    """VQModel.encode(images).latents (quant_conv output, unscaled), as the img2img / inpaint pipelines use."""

    def __init__(self, movq):
        super().__init__()
        self.movq = movq

    def forward(self, images):
        return self.movq.encode(images, return_dict=False)[0]


def load_module(layout: Layout, name: str):
    """The fp32 diffusers / transformers module behind one component (the prior's PriorTransformer for PRIOR)."""
    import diffusers
    import transformers

    where = {PRIOR_TEXT_ENCODER: (transformers.CLIPTextModelWithProjection, layout.prior / "text_encoder"),
             PRIOR: (diffusers.PriorTransformer, layout.prior / "prior"),
             IMAGE_ENCODER: (transformers.CLIPVisionModelWithProjection, layout.prior / "image_encoder"),
             DECODER_UNET: (diffusers.UNet2DConditionModel, layout.decoder / "unet"),
             MOVQ_DECODER: (diffusers.VQModel, layout.decoder / "movq"),
             MOVQ_ENCODER: (diffusers.VQModel, layout.decoder / "movq")}
    cls, folder = where[name]
    kwargs = {"attn_implementation": "eager"} if cls.__module__.startswith("transformers") else {}
    try:
        return cls.from_pretrained(folder, torch_dtype=torch.float32, **kwargs).eval().float()
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"cannot load {name} from {folder}: {exc}".splitlines()[0]) from None


WRAPPERS = {PRIOR_TEXT_ENCODER: PriorTextEncoderWrapper, PRIOR: PriorWrapper, IMAGE_ENCODER: ImageEncoderWrapper,
            DECODER_UNET: DecoderUNetWrapper, MOVQ_DECODER: MovqDecoderWrapper, MOVQ_ENCODER: MovqEncoderWrapper}


def load_component(layout: Layout, name: str) -> torch.nn.Module:
    """The eval-mode fp32 wrapper of one component, with its spec's inputs and outputs."""
    return WRAPPERS[name](load_module(layout, name)).eval()
