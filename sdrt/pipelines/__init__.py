"""One module per model family's orchestration, sharing one denoising loop (``loop.py``), one CFG function
(``sdrt.guidance``), the schedulers and the backends. ``sdrt.pipeline.Pipeline`` picks the family from the
manifest; ``base.py`` holds what every family has (the manifest, the engine cache, timings, the result).
"""
