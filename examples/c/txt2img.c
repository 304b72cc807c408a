/* txt2img with libsdrt: open an ENGINE_DIR, generate with a progress bar on stderr, save a PNG with
 * A1111 parameters, close.  Built by `make capi` as build/capi/txt2img.
 *
 *   build/capi/txt2img ENGINE_DIR "a photo of a cat" cat.png [steps [seed [scheduler]]]
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "sdrt.h"

static int progress(int step, int total, void *user_data) {
    const int width = 30;
    int done = step * width / total;
    (void)user_data;
    fprintf(stderr, "\r[%.*s%*s] %d/%d", done, "##############################", width - done, "", step, total);
    if (step == total) fputc('\n', stderr);
    return 0; /* nonzero would cancel */
}

static void on_log(int level, const char *message, void *user_data) {
    (void)user_data;
    fprintf(stderr, "sdrt [%d] %s\n", level, message);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ENGINE_DIR PROMPT OUT.png [steps [seed [scheduler]]]\n", argv[0]);
        return 2;
    }
    if (sdrt_abi_version() != SDRT_ABI_VERSION) {
        fprintf(stderr, "libsdrt ABI %u, header %d\n", (unsigned)sdrt_abi_version(), SDRT_ABI_VERSION);
        return 1;
    }
    sdrt_context_params cp;
    sdrt_context_params_init(&cp);
    cp.engine_dir = argv[1];
    cp.log = on_log;
    sdrt_context *ctx;
    if (sdrt_context_open(&cp, &ctx) != SDRT_OK) {
        fprintf(stderr, "open: %s\n", sdrt_last_error(NULL));
        return 2;
    }

    sdrt_generate_params gp;
    sdrt_generate_params_init(&gp);
    gp.prompt = argv[2];
    gp.steps = argc > 4 ? atoi(argv[4]) : 20;
    gp.seed = argc > 5 ? strtoll(argv[5], NULL, 10) : -1;
    gp.scheduler = argc > 6 ? argv[6] : NULL;
    gp.progress = progress;
    sdrt_image *images;
    int count;
    int64_t seed;
    sdrt_status status = sdrt_generate(ctx, &gp, &images, &count, &seed);
    if (status != SDRT_OK) {
        fprintf(stderr, "generate (status %d): %s\n", (int)status, sdrt_last_error(ctx));
        sdrt_context_close(ctx);
        return 2;
    }

    char parameters[4096];
    snprintf(parameters, sizeof parameters, "%s\nSteps: %d, Sampler: %s, CFG scale: %g, Seed: %" PRId64
             ", Size: %ux%u", gp.prompt, gp.steps, gp.scheduler ? gp.scheduler : "model default",
             (double)gp.guidance, seed, (unsigned)images[0].width, (unsigned)images[0].height);
    status = sdrt_image_save_png(&images[0], argv[3], parameters);
    if (status == SDRT_OK) printf("saved %s (seed %" PRId64 ")\n", argv[3], seed);
    else fprintf(stderr, "save: %s\n", sdrt_last_error(NULL));
    sdrt_images_free(images, count);
    sdrt_context_close(ctx);
    return status == SDRT_OK ? 0 : 2;
}
