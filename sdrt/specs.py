"""Component I/O specs: the single source of truth for every engine's inputs and outputs.

One frozen ``ComponentSpec`` per component (text encoder, UNet, VAE decoder, VAE encoder) holds the
tensor names (mirroring diffusers' argument names), dtypes, which axes are dynamic, the shape of
every tensor as a function of (batch, height, width) and the min/opt/max profile for a size range.
The exporter, the engine builder and the runtime's buffer allocation all read these; nothing else
restates a name or an axis. Specs are built from ``ModelDims`` (sdrt/dims.py, stored in the manifest), so a family
with more inputs (SDXL's pooled embeddings and time ids, LCM's guidance embedding) only adds
tensors here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdrt.dims import (  # noqa: F401  (re-exported: sdrt.specs is where callers import them from)
    BATCH, COMPONENTS, CONTROLNET_PREFIX, DYNAMIC_AXES, HEIGHT, LATENT_HEIGHT, LATENT_WIDTH, OPTIONAL_COMPONENTS,
    TEXT_ENCODER, TEXT_ENCODER_2, TINY_VAE_DECODER, TINY_VAE_ENCODER, UNET, UNET_CONTROL, VAE_DECODER, VAE_ENCODER,
    WIDTH, ModelDims, SizeRange, axis_value, down_axis,
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int32", ...
    dims: tuple  # ints (static), names from DYNAMIC_AXES, or ``down_axis`` names of the latent axes

    def shape(self, batch: int, height: int, width: int, scale: int = 8) -> tuple[int, ...]:
        values = {BATCH: batch, HEIGHT: height, WIDTH: width,
                  LATENT_HEIGHT: height // scale, LATENT_WIDTH: width // scale}
        return tuple(axis_value(d, values) for d in self.dims)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_factor: int = 1  # 2 where classifier-free guidance doubles the batch in one call
    scale: int = 8

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Shapes of every input and output for an engine batch and a pixel size."""
        return {t.name: t.shape(batch, height, width, self.scale) for t in self.tensors}

    def output_shapes(self, input_shapes: dict[str, tuple]) -> dict[str, tuple[int, ...]]:
        """Output shapes implied by the inputs' shapes: dynamic axis values are read off the inputs (pixel
        and latent sizes from each other by ``scale``). For backends that preallocate outputs."""
        sizes: dict[str, int] = {}
        for t in self.inputs:
            for axis, name in t.dynamic_axes.items():
                sizes.setdefault(name, int(input_shapes[t.name][axis]))
        for pixel, latent in ((HEIGHT, LATENT_HEIGHT), (WIDTH, LATENT_WIDTH)):
            if latent in sizes:
                sizes.setdefault(pixel, sizes[latent] * self.scale)
            elif pixel in sizes:
                sizes[latent] = sizes[pixel] // self.scale
        return {t.name: tuple(axis_value(d, sizes) for d in t.dims) for t in self.outputs}

    def profile(self, sizes: SizeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
        """min/opt/max shape of every input, for a TensorRT optimization profile."""
        max_batch = sizes.max_batch * self.batch_factor
        points = ((1, sizes.min_size), (self.batch_factor, sizes.opt_size), (max_batch, sizes.max_size))
        return {
            t.name: tuple(t.shape(b, s, s, self.scale) for b, s in points) for t in self.inputs
        }


@dataclass(frozen=True)
class ModelSpecs:
    """All component specs of one model."""

    dims: ModelDims
    components: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> ComponentSpec:
        return self.components[name]

    def __iter__(self):
        return iter(self.components.values())


def _text_encoders(dims: ModelDims, s: int) -> list[ComponentSpec]:
    """CLIPTextModel (+ SDXL's CLIPTextModelWithProjection); ``hidden_states`` is the penultimate layer."""
    n = dims.text_max_length
    outputs = [TensorSpec("last_hidden_state", "float32", (BATCH, n, dims.text_hidden_size)),
               TensorSpec("pooler_output", "float32", (BATCH, dims.text_hidden_size))]
    if not dims.has_text_encoder_2:
        return [ComponentSpec(TEXT_ENCODER, (TensorSpec("input_ids", "int32", (BATCH, n)),), tuple(outputs),
                              batch_factor=2, scale=s)]
    outputs.append(TensorSpec("hidden_states", "float32", (BATCH, n, dims.text_hidden_size)))
    second = (TensorSpec("hidden_states", "float32", (BATCH, n, dims.text_2_hidden_size)),
              TensorSpec("text_embeds", "float32", (BATCH, dims.text_embeds_dim)))
    return [ComponentSpec(name, (TensorSpec("input_ids", "int32", (BATCH, n)),), outs, batch_factor=2, scale=s)
            for name, outs in ((TEXT_ENCODER, tuple(outputs)), (TEXT_ENCODER_2, second))]


def build_specs(dims: ModelDims) -> ModelSpecs:
    """Build every component spec from the model's dimensions."""
    if dims.family == "kandinsky22":  # two stages, other components: sdrt/specs_kandinsky.py
        from sdrt.specs_kandinsky import build_kandinsky_specs

        return build_kandinsky_specs(dims)
    s = dims.vae_scale_factor
    unet_inputs = [
        TensorSpec("sample", "float32", (BATCH, dims.unet_in_channels, LATENT_HEIGHT, LATENT_WIDTH)),
        TensorSpec("timestep", "float32", (BATCH,)),
        TensorSpec("encoder_hidden_states", "float32", (BATCH, dims.text_max_length, dims.cross_attention_dim)),
    ]
    if dims.time_cond_proj_dim:
        unet_inputs.append(TensorSpec("timestep_cond", "float32", (BATCH, dims.time_cond_proj_dim)))
    if dims.has_text_encoder_2:
        unet_inputs += [TensorSpec("text_embeds", "float32", (BATCH, dims.text_embeds_dim)),
                        TensorSpec("time_ids", "float32", (BATCH, dims.time_ids_dim))]
    unet = ComponentSpec(
        UNET,
        inputs=tuple(unet_inputs),
        outputs=(TensorSpec("out_sample", "float32", (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        batch_factor=2,
        scale=s,
    )
    decoder = ComponentSpec(
        VAE_DECODER,
        inputs=(TensorSpec("latent", "float32", (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        outputs=(TensorSpec("images", "float32", (BATCH, dims.image_channels, HEIGHT, WIDTH)),),
        scale=s,
    )
    encoder = ComponentSpec(
        VAE_ENCODER,
        inputs=(TensorSpec("images", "float32", (BATCH, dims.image_channels, HEIGHT, WIDTH)),),
        outputs=(
            TensorSpec("mean", "float32", (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),
            TensorSpec("logvar", "float32", (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH)),
        ),
        scale=s,
    )
    return ModelSpecs(dims, {c.name: c for c in (*_text_encoders(dims, s), unet, decoder, encoder,
                                                 *_tiny_vae(dims, s), *_controlnets(dims, unet))})


def control_residuals(dims: ModelDims) -> tuple[TensorSpec, ...]:
    """diffusers' ``ControlNetModel`` outputs (``down_block_res_samples``, ``mid_block_res_sample``), which the
    UNet takes as ``down_block_additional_residuals`` / ``mid_block_additional_residual``; one name each."""
    *down, mid = dims.control_residuals or ()
    names = [f"down_block_res_sample_{i}" for i in range(len(down))] + ["mid_block_res_sample"]
    return tuple(TensorSpec(name, "float32", (BATCH, c, down_axis(LATENT_HEIGHT, n), down_axis(LATENT_WIDTH, n)))
                 for name, (c, n) in zip(names, (*down, mid)))


def controlnet_name(index: int) -> str:
    return f"{CONTROLNET_PREFIX}{index}"


def control_components(dims: dict) -> tuple[str, ...]:
    """The ControlNet component names a manifest's ``dims`` section allows."""
    count = dims.get("controlnets") or 0
    return (*(controlnet_name(k) for k in range(count)), UNET_CONTROL) if count else ()


def _controlnets(dims: ModelDims, unet: ComponentSpec) -> list[ComponentSpec]:
    """``controlnet_<k>`` (``ControlNetModel.forward``; ``conditioning_scale`` holds one factor per residual, so
    guess mode's logspace weights are an input too) and ``unet_control``: the UNet plus every residual."""
    if not dims.controlnets:
        return []
    residuals = control_residuals(dims)
    sample = TensorSpec("sample", "float32", (BATCH, dims.latent_channels, LATENT_HEIGHT, LATENT_WIDTH))
    inputs = (sample, *unet.inputs[1:3],
              TensorSpec("controlnet_cond", "float32", (BATCH, dims.image_channels, HEIGHT, WIDTH)),
              TensorSpec("conditioning_scale", "float32", (len(residuals),)),
              *(t for t in unet.inputs if t.name in ("text_embeds", "time_ids")))
    nets = [ComponentSpec(controlnet_name(k), inputs, residuals, batch_factor=2, scale=unet.scale)
            for k in range(dims.controlnets)]
    return nets + [ComponentSpec(UNET_CONTROL, unet.inputs + residuals, unet.outputs, batch_factor=2, scale=unet.scale)]


def _tiny_vae(dims: ModelDims, s: int) -> list[ComponentSpec]:
    """diffusers' AutoencoderTiny (TAESD): ``decode(latent)`` -> images in [-1, 1]; ``encode(images).latents``
    (deterministic: no posterior to sample, as diffusers' ``retrieve_latents`` takes ``.latents``)."""
    if not dims.tiny_vae_latent_channels:
        return []
    latent = (BATCH, dims.tiny_vae_latent_channels, LATENT_HEIGHT, LATENT_WIDTH)
    images = (BATCH, dims.image_channels, HEIGHT, WIDTH)
    return [ComponentSpec(TINY_VAE_DECODER, (TensorSpec("latent", "float32", latent),),
                          (TensorSpec("images", "float32", images),), scale=s),
            ComponentSpec(TINY_VAE_ENCODER, (TensorSpec("images", "float32", images),),
                          (TensorSpec("latents", "float32", latent),), scale=s)]
