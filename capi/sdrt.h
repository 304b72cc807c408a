/* libsdrt: the C ABI of sdrt, a torch-free Stable Diffusion runtime (C99).
 *
 * The functions call the sdrt Python runtime (sdrt.pipeline.Pipeline) inside an embedded interpreter
 * (cffi embedding mode): same semantics, defaults and pixels as the Python API for the same seed.
 *
 * Build and link:   make capi   ->  build/capi/libsdrt.so, build/capi/sdrt.pc
 *                   cc app.c -I capi -L build/capi -lsdrt
 *                   (or: cc app.c $(PKG_CONFIG_PATH=build/capi pkg-config --cflags --libs sdrt))
 * The library's SONAME is its absolute path, so such a program finds it with no rpath or
 * LD_LIBRARY_PATH; to move the library, rebuild it there (python capi/build.py OUTDIR).
 *
 * Python environment: the library starts the interpreter on the first call that needs it (not the
 * *_params_init functions, sdrt_abi_version, sdrt_version, sdrt_cancel, sdrt_last_error,
 * sdrt_images_free, nor a call refused for a NULL or struct_size), once per process, in the
 * environment it was built against (that sys.prefix is baked in at build time): as if DIR/bin/pythonX.Y
 * ran, so the venv's pyvenv.cfg and site-packages apply; no environment variable is needed.
 * SDRT_PYTHONHOME=DIR overrides DIR: a virtual environment (a folder with pyvenv.cfg) or a Python
 * installation prefix, with sdrt installed.  A DIR without a Python standard library is reported
 * (SDRT_ERR_INTERNAL), not started.  The other PYTHON* variables of the process apply as for any
 * Python.  If the host process already runs Python, that interpreter is used as it is.
 *
 * Errors: every function that returns sdrt_status sets this thread's last error ("" on SDRT_OK) and,
 * when it has a context, that context's last error; sdrt_last_error() reads them.  No Python
 * exception ever reaches the caller; a bad argument (NULL pointer, wrong struct_size, size out of
 * range, unknown scheduler, missing or tampered ENGINE_DIR, ...) is a status, never a crash.
 *
 * Logging: messages go to the context's log callback.  Without one, nothing is printed, unless the
 * environment variable SDRT_LOG_STDERR=1 is set: then messages (and any output of Python code, which
 * is otherwise routed to the log) go to stderr.
 *
 * Threads: every function may be called from any thread.  Calls on one context are serialized inside
 * (a second sdrt_generate on the same context waits for the first); several contexts may run at once
 * (their ONNX Runtime work runs in parallel; the Python glue between steps takes the interpreter's
 * lock briefly).  sdrt_cancel and sdrt_last_error never wait.  Callbacks run on the calling thread,
 * inside sdrt_generate / sdrt_context_open; from a callback, sdrt_generate on the same context returns
 * SDRT_ERR_INPUT and sdrt_context_close on it is ignored (sdrt_cancel is fine).  sdrt_context_close
 * from another thread cancels the generates in flight on that context and waits for them.
 *
 * Versioning: every params struct starts with struct_size, set by its *_params_init function.  A
 * caller compiled against an older, smaller struct keeps working: fields beyond its struct_size take
 * their defaults.  A struct_size below the first published layout (SDRT_*_PARAMS_SIZE_V1), between two
 * published layouts' sizes (SDRT_*_PARAMS_SIZE_V<n> and sizeof; it would cut a field), above 4096, or above
 * what this library knows with any unknown trailing byte nonzero, is SDRT_ERR_INPUT.
 */
#ifndef SDRT_H
#define SDRT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Incremented on an incompatible change of this header; compatible additions keep it. */
#define SDRT_ABI_VERSION 1

/* Log levels passed to sdrt_log_fn (Python's logging numbers). */
#define SDRT_LOG_DEBUG 10
#define SDRT_LOG_INFO 20
#define SDRT_LOG_WARNING 30
#define SDRT_LOG_ERROR 40
#define SDRT_LOG_CRITICAL 50

/* sdrt_generate_params.strength: the mode's default (img2img 0.75, Kandinsky 0.3; inpaint 1.0, SDXL 0.9999). */
#define SDRT_STRENGTH_DEFAULT (-1.0f)
/* sdrt_generate_params.prior_guidance: the pipeline's default (4.0). */
#define SDRT_PRIOR_GUIDANCE_DEFAULT (-1.0f)

/* BEGIN CFFI DECLARATIONS (capi/build.py hands the text up to END to cffi) */

/* An open model (one ENGINE_DIR, one backend).  Opaque. */
typedef struct sdrt_context sdrt_context;

typedef enum {
    SDRT_OK = 0,
    SDRT_ERR_INPUT = 2,     /* a bad argument: NULL pointer, struct_size, size, steps, scheduler, image... */
    SDRT_ERR_ARTIFACT = 3,  /* ENGINE_DIR missing, invalid manifest, file missing or not matching its sha256 */
    SDRT_ERR_CANCELLED = 4, /* sdrt_cancel, or the progress callback returned nonzero */
    SDRT_ERR_INTERNAL = 5,  /* anything else: the Python runtime failed to start, NaN in the model, a bug */
    SDRT_ERR_IO = 6         /* a file could not be written (sdrt_image_save_png) */
} sdrt_status;

/* An image: width * height * channels bytes, row-major, interleaved, 8 bits per channel.
 * channels: 3 = RGB (generated images); inputs may also be 1 (gray) or 4 (RGBA). */
typedef struct {
    uint32_t width;
    uint32_t height;
    uint32_t channels;
    uint8_t *data;
} sdrt_image;

/* Called after each denoising step: step = steps done (1..total).  total is the number of UNet
 * iterations the scheduler runs, as Pipeline's callback reports it: `steps` for most schedulers, more
 * for Heun/PNDM (diffusers' timesteps), fewer for img2img/inpaint with strength < 1.  Return nonzero to
 * cancel (sdrt_generate then returns SDRT_ERR_CANCELLED, also at the last step). */
typedef int (*sdrt_progress_fn)(int step, int total, void *user_data);

/* One log message (one line, UTF-8, valid during the call); level: SDRT_LOG_*. */
typedef void (*sdrt_log_fn)(int level, const char *message, void *user_data);

typedef struct {
    uint32_t struct_size;   /* sizeof(sdrt_context_params), set by sdrt_context_params_init */
    const char *engine_dir; /* ENGINE_DIR written by `sdrt export` (required) */
    const char *backend;    /* "ort-cpu" (default, also for NULL), "ort-cuda", "tensorrt", "tensorrt-rtx" */
    int threads;            /* ONNX Runtime intra-op threads, at most the machine's logical CPUs (more is
                               SDRT_ERR_INPUT); 0 (default): the usable cores */
    sdrt_log_fn log;        /* this context's log messages; NULL (default): none (see SDRT_LOG_STDERR) */
    void *log_user_data;    /* passed to log */
    /* --- added after the first layout (SDRT_CONTEXT_PARAMS_SIZE_V1 ends here) --- */
    int log_level;          /* lowest level passed to log; default SDRT_LOG_WARNING */
} sdrt_context_params;

typedef struct {
    uint32_t struct_size;        /* sizeof(sdrt_generate_params), set by sdrt_generate_params_init */
    const char *mode;            /* "txt2img" (default, also for NULL) | "img2img" | "inpaint" */
    const char *prompt;          /* UTF-8, required (NULL is SDRT_ERR_INPUT) */
    const char *negative_prompt; /* NULL (default): "" */
    const char *scheduler;       /* as the CLI's --scheduler ("Euler a", "DPM++ 2M Karras", "DDIM", class
                                    names, ...); NULL (default): the model's own */
    int width;                   /* pixels; 0 (default): the artifact's default (the input image's size,
                                    rounded down to a multiple of 8, for img2img/inpaint) */
    int height;                  /* as width */
    int steps;                   /* denoising steps, >= 1; default 30 */
    int batch;                   /* images per prompt, 1..the artifact's max batch; default 1 */
    float guidance;              /* classifier-free guidance scale, >= 0; default 7.5 */
    float strength;              /* img2img/inpaint, in (0, 1]; default SDRT_STRENGTH_DEFAULT */
    int64_t seed;                /* >= 0: reproducible (as torch.Generator("cpu").manual_seed);
                                    -1 (default): random (returned in *seed_out); other
                                    negative values as torch's manual_seed takes them */
    const sdrt_image *init_image; /* img2img and inpaint (required there; NULL for txt2img) */
    const sdrt_image *mask_image; /* inpaint (required there): white repaints, black keeps; same size */
    sdrt_progress_fn progress;   /* NULL (default): none */
    void *user_data;             /* passed to progress */
    /* --- added after the first layout (SDRT_GENERATE_PARAMS_SIZE_V1 ends here) --- */
    const char *vae;             /* "full" (default, also for NULL) | "tiny": the TAESD `sdrt export
                                    --tiny-vae` added (SDRT_ERR_INPUT when the artifact has none) */
    /* --- added after the second layout (SDRT_GENERATE_PARAMS_SIZE_V2 ends here) --- */
    const char *rng;             /* whose generator seed reproduces, as the CLI's --rng: "cpu" (default,
                                    also for NULL; torch.Generator("cpu")) | "cuda" | "cuda:GPU" (GPU a name:
                                    "h100", "a100", "4090", "t4", ... or "sm=N"; torch.Generator("cuda") on
                                    that GPU, computed on the CPU); anything else is SDRT_ERR_INPUT */
    /* --- added after the third layout (SDRT_GENERATE_PARAMS_SIZE_V3 ends here) --- */
    const sdrt_image *control_images; /* ControlNet (artifacts exported with --controlnet): control_count
                                         images, one per ControlNet, in export order, any size (resized to
                                         the output size); NULL (default): no control */
    int control_count;           /* images in control_images; default 0 */
    float control_start;         /* fraction of the steps where control starts, in [0, 1); default 0 */
    float control_end;           /* ... where it ends, in (start, 1]; default 1 */
    int guess_mode;              /* nonzero: diffusers' guess_mode; default 0 */
    const float *control_scales; /* control_count scales (finite); NULL (default): 1.0 each */
    const char *const *lora_paths; /* run-time LoRA: lora_count .safetensors files (kohya or peft);
                                      NULL (default): none */
    const float *lora_weights;   /* lora_count weights; NULL (default): 1.0 each */
    int lora_count;              /* default 0 */
    int prior_steps;             /* Kandinsky 2.2 artifacts: the prior's steps; 0 (default): 25 */
    float prior_guidance;        /* the prior's guidance; SDRT_PRIOR_GUIDANCE_DEFAULT (default): 4.0.
                                    Both are SDRT_ERR_INPUT when set for another family.  (Kandinsky's
                                    decoder defaults are 100 steps, guidance 4.0: set steps/guidance.) */
} sdrt_generate_params;

/* SDRT_ABI_VERSION of the library (compare with the header's at start-up). */
uint32_t sdrt_abi_version(void);
/* The sdrt version the library was built from, e.g. "0.1.0" (static string). */
const char *sdrt_version(void);

/* Set struct_size and every default.  Never start Python; p may be NULL (no-op). */
void sdrt_context_params_init(sdrt_context_params *p);
void sdrt_generate_params_init(sdrt_generate_params *p);

/* Open ENGINE_DIR (manifest, tokenizers, file checks; engines open on the first generate).
 * On SDRT_OK, *out is a new context for sdrt_context_close; otherwise *out is NULL. */
sdrt_status sdrt_context_open(const sdrt_context_params *p, sdrt_context **out);

/* Generate p->batch images.  On SDRT_OK: *images_out holds *count_out images (free them with
 * sdrt_images_free) and *seed_out (if seed_out is not NULL) the seed used.  Otherwise *images_out
 * is NULL and *count_out 0.  images_out and count_out are required; seed_out may be NULL. */
sdrt_status sdrt_generate(sdrt_context *ctx, const sdrt_generate_params *p,
                          sdrt_image **images_out, int *count_out, int64_t *seed_out);

/* Free the images of one sdrt_generate (images may be NULL). */
void sdrt_images_free(sdrt_image *images, int count);

/* Write image as PNG at path (must end in .png), atomically (temp file, then rename), with A1111's
 * "parameters" text chunk when parameters is not NULL.  SDRT_ERR_IO if it cannot be written. */
sdrt_status sdrt_image_save_png(const sdrt_image *image, const char *path, const char *parameters);

/* Cancel: every sdrt_generate on ctx running or waiting when this is called returns
 * SDRT_ERR_CANCELLED after its current step; later calls are not affected (a cancel before a generate
 * starts does not reach it).  Any thread, any time, never blocks, async-signal-safe; ctx may be NULL or
 * closed (no-op; see "Closed contexts"). */
void sdrt_cancel(sdrt_context *ctx);

/* ctx NULL: this thread's last error; otherwise ctx's last error (from any thread).  "" when the last
 * call succeeded; never NULL.  Valid until this thread's next call of a libsdrt function.  A closed ctx
 * gives a message saying so. */
const char *sdrt_last_error(const sdrt_context *ctx);

/* Close ctx and free what it holds (NULL or already closed: no-op).  The sdrt_generate calls on ctx
 * running or waiting at that moment are cancelled (SDRT_ERR_CANCELLED) and waited for.
 * Closed contexts: the handle itself stays valid memory (about 160 bytes, kept until the process exits and
 * never reused for another context), so a call on a closed ctx is safe and refused: sdrt_generate returns
 * SDRT_ERR_INPUT ("ctx is closed"), sdrt_last_error says it is closed, sdrt_cancel and sdrt_context_close
 * do nothing.  ctx must still be a pointer sdrt_context_open returned. */
void sdrt_context_close(sdrt_context *ctx);

/* END CFFI DECLARATIONS */

/* The published layouts (struct_size values a caller may pass besides the current sizeof): a struct_size
 * below the first is SDRT_ERR_INPUT.  Each addition to a struct publishes the previous end as V<n+1>. */
#define SDRT_CONTEXT_PARAMS_SIZE_V1 (offsetof(sdrt_context_params, log_level))
#define SDRT_GENERATE_PARAMS_SIZE_V1 (offsetof(sdrt_generate_params, vae))
#define SDRT_GENERATE_PARAMS_SIZE_V2 (offsetof(sdrt_generate_params, rng))
#define SDRT_GENERATE_PARAMS_SIZE_V3 (offsetof(sdrt_generate_params, control_images))

#ifdef __cplusplus
}
#endif

#endif /* SDRT_H */
