"""Model dimensions and size ranges: the numbers every component spec is built from (``sdrt.specs``).

The dynamic axis and component names, ``ModelDims`` (stored in the manifest), ``SizeRange`` (the pixel
sizes and batch an artifact serves) and the axis arithmetic (``down_axis``, ``axis_value``). ``sdrt.specs``
re-exports every name here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sdrt.errors import InputError

# Dynamic axis names. A dim is either an int (static) or one of these.
BATCH, HEIGHT, WIDTH = "batch", "height", "width"
LATENT_HEIGHT, LATENT_WIDTH = "latent_height", "latent_width"
DYNAMIC_AXES = (BATCH, HEIGHT, WIDTH, LATENT_HEIGHT, LATENT_WIDTH)

TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER = "text_encoder", "unet", "vae_decoder", "vae_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
# TAESD (diffusers' AutoencoderTiny), exported beside the full VAE by ``sdrt export --tiny-vae``
TINY_VAE_DECODER, TINY_VAE_ENCODER = "tiny_vae_decoder", "tiny_vae_encoder"
# ControlNet (``sdrt export --controlnet``): one ``controlnet_<k>`` per net, and the UNet taking their residuals
CONTROLNET_PREFIX, UNET_CONTROL = "controlnet_", "unet_control"
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)  # every model has these
OPTIONAL_COMPONENTS = (TEXT_ENCODER_2, TINY_VAE_DECODER, TINY_VAE_ENCODER)  # SDXL's second text encoder; TAESD


@dataclass(frozen=True)
class ModelDims:
    """The numbers that fix every component's I/O; written to and read from the manifest."""

    family: str = "sd15"
    latent_channels: int = 4
    unet_in_channels: int = 4  # 9 for inpainting UNets (latent + mask + masked-image latent)
    text_max_length: int = 77
    text_hidden_size: int = 768
    cross_attention_dim: int = 768
    vae_scale_factor: int = 8
    image_channels: int = 3
    # Optional conditioning; None for families without it.
    time_cond_proj_dim: int | None = None  # LCM: width of the UNet's guidance embedding (timestep_cond)
    text_2_hidden_size: int | None = None  # SDXL: width of text_encoder_2 (CLIPTextModelWithProjection)
    text_embeds_dim: int | None = None  # SDXL: its pooled, projected output (UNet text_embeds)
    time_ids_dim: int | None = None  # SDXL: micro-conditioning numbers (UNet time_ids): 6
    tiny_vae_latent_channels: int | None = None  # set when the artifact holds a tiny VAE (TAESD)
    controlnets: int | None = None  # how many ControlNets the artifact holds (``controlnet_0`` ...)
    # (channels, downsamplings) of each UNet down-block residual, then the mid block's (12 + 1 for SD1.x/2.x)
    control_residuals: tuple | None = None
    # Kandinsky 2.2 (family "kandinsky22", sdrt/specs_kandinsky.py); None for the SD families.
    image_embed_dim: int | None = None  # CLIP image embedding width D (prior latents, UNet image_embeds): 1280
    unet_out_channels: int | None = None  # decoder UNet output: 8 (eps + learned variance)
    image_encoder_size: int | None = None  # CLIPVisionModelWithProjection input side: 224

    @property
    def has_text_encoder_2(self) -> bool:
        """SDXL layout: two text encoders, penultimate hidden states, pooled embeds and time ids."""
        return self.text_2_hidden_size is not None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelDims":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("control_residuals") is not None:
            known["control_residuals"] = tuple((int(c), int(n)) for c, n in known["control_residuals"])
        return cls(**known)


@dataclass(frozen=True)
class SizeRange:
    """Pixel sizes (multiples of the VAE scale) and the largest image batch an artifact serves."""

    min_size: int = 256
    opt_size: int = 512
    max_size: int = 1024
    max_batch: int = 4

    def __post_init__(self):
        for name in ("min_size", "opt_size", "max_size"):
            value = getattr(self, name)
            if value <= 0 or value % 8:
                raise InputError(f"{name.replace('_', '-')} must be a positive multiple of 8, got {value}")
        if not self.min_size <= self.max_size:
            raise InputError(f"min-size {self.min_size} is larger than max-size {self.max_size}")
        if not self.min_size <= self.opt_size <= self.max_size:
            object.__setattr__(self, "opt_size", min(max(self.opt_size, self.min_size), self.max_size))
        if self.max_batch < 1:
            raise InputError(f"max-batch must be at least 1, got {self.max_batch}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SizeRange":
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})

    def check(self, width: int, height: int, batch: int, scale: int = 8) -> None:
        """Raise ``InputError`` naming the allowed range if a request does not fit this artifact."""
        for label, value in (("width", width), ("height", height)):
            if value % scale:
                raise InputError(f"{label} {value} is not a multiple of {scale}")
            if not self.min_size <= value <= self.max_size:
                raise InputError(
                    f"{label} {value} is outside this artifact's range {self.min_size}..{self.max_size} "
                    "(rebuild with --min-size/--max-size to serve it)"
                )
        if not 1 <= batch <= self.max_batch:
            raise InputError(f"batch {batch} is outside this artifact's range 1..{self.max_batch}")


def down_axis(axis: str, level: int) -> str:
    """A latent axis after ``level`` stride-2 convolutions (kernel 3, padding 1): ceil(n / 2**level)."""
    return axis if level == 0 else f"{axis}/{2 ** level}"


def axis_value(dim, values: dict) -> int:
    """The size of one dim: an int, a name in ``values``, or a ``down_axis`` of one."""
    if not isinstance(dim, str):
        return int(dim)
    if dim in values:
        return values[dim]
    base, _, divisor = dim.partition("/")
    return -(-values[base] // int(divisor))
