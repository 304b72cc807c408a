"""The argument groups the ``sdrt`` subcommands share: size range, backend, request, ControlNet."""

from __future__ import annotations


def add_size_range(p) -> None:
    p.add_argument("--min-size", type=int, default=256, help="smallest image side served (pixels)")
    p.add_argument("--opt-size", type=int, default=None, help="side TensorRT tunes for (default 512)")
    p.add_argument("--max-size", type=int, default=1024, help="largest image side served (pixels)")
    p.add_argument("--max-batch", type=int, default=4, help="most images per prompt")


def add_backend(p) -> None:
    from sdrt.backends import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="ort-cpu",
                   help="what runs the components: the exported ONNX (or the graphs `sdrt build-engines` optimized "
                        "for this backend) on ONNX Runtime, or TensorRT engines built by `sdrt build-engines`")


def add_control(g) -> None:
    g.add_argument("--control-image", metavar="IMG", action="append", default=None,
                   help="control image, one per ControlNet in export order (resized to the output size)")
    g.add_argument("--control-scale", metavar="S", type=float, action="append", default=None,
                   help="conditioning scale per ControlNet (one value: every net; default 1.0)")
    g.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps where control starts")
    g.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps where control ends")
    g.add_argument("--guess-mode", action="store_true",
                   help="diffusers' guess mode: ControlNets see the conditional batch only, residuals scaled "
                        "from 0.1 (shallow) to 1.0 (deep)")


def add_request(g, mode: str) -> None:
    g.add_argument("--prompt", required=True, help="what to draw")
    g.add_argument("--negative-prompt", default="", help="what to steer away from")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: 30); Kandinsky 2.2's decoder: 100 (the pipelines' defaults, "
                        "as diffusers)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 0 or 1: no CFG (default 7.5; Kandinsky 2.2's decoder 4.0)")
    g.add_argument("--prior-steps", type=int, default=None, help="Kandinsky 2.2: the prior's steps (default 25)")
    g.add_argument("--prior-guidance", type=float, default=None,
                   help="Kandinsky 2.2: the prior's guidance scale (default 4.0)")
    g.add_argument("--seed", type=int, default=None, help="default: random, printed")
    g.add_argument("--width", type=int, default=None, help="default: the artifact's opt size")
    g.add_argument("--height", type=int, default=None, help="default: the artifact's opt size")
    g.add_argument("--scheduler", default=None,
                   help="e.g. 'Euler a', 'DPM++ 2M Karras', DDIM; default: the model's own")
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    if mode != "txt2img":
        g.add_argument("--strength", type=float, default=None,
                       help="how much of the image to redraw, in (0, 1] [as diffusers: img2img 0.75, Kandinsky "
                            "2.2 0.3; inpaint 1.0, SDXL 0.9999]")


GENERATE_EXAMPLES = {
    "txt2img": ('sdrt txt2img --engines engines/tiny --prompt "a photo of a cat" --seed 42 --out cat.png',
                'sdrt txt2img --engines engines/sd15 --prompt "a castle" --negative-prompt blurry --steps 20 \\\n'
                '      --scheduler "DPM++ 2M Karras" --width 512 --height 768 --batch 2 --out castle.png',
                'sdrt txt2img --engines engines/sdxl-turbo --prompt "a fox" --steps 1 --guidance 0 --out fox.png'),
    "img2img": ('sdrt img2img --engines engines/sd15 --prompt "an oil painting" --image in.png --strength 0.6 '
                '--out out.png',),
    "inpaint": ('sdrt inpaint --engines engines/sd15 --prompt "a red sofa" --image room.png --mask mask.png '
                '--out out.png',),
}
