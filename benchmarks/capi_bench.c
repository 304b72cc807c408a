/* The C side of benchmarks/capi_overhead.py: first-call times and per-generation times of libsdrt
 * from a plain C host (its own interpreter).  Prints one JSON object.
 *
 *   capi_bench ENGINE_DIR RUNS STEPS SIZE
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "sdrt.h"

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static sdrt_context *open_context(const char *dir, double *us) {
    sdrt_context_params p;
    sdrt_context *ctx = NULL;
    sdrt_context_params_init(&p);
    p.engine_dir = dir;
    p.threads = 1;
    double start = now_us();
    if (sdrt_context_open(&p, &ctx) != SDRT_OK) {
        fprintf(stderr, "open: %s\n", sdrt_last_error(NULL));
        exit(1);
    }
    *us = now_us() - start;
    return ctx;
}

static double generate(sdrt_context *ctx, int steps, int size) {
    sdrt_generate_params p;
    sdrt_image *images;
    int count;
    sdrt_generate_params_init(&p);
    p.prompt = "a photo of a cat";
    p.steps = steps;
    p.width = p.height = size;
    p.seed = 0;
    double start = now_us();
    if (sdrt_generate(ctx, &p, &images, &count, NULL) != SDRT_OK) {
        fprintf(stderr, "generate: %s\n", sdrt_last_error(ctx));
        exit(1);
    }
    double us = now_us() - start;
    sdrt_images_free(images, count);
    return us;
}

int main(int argc, char **argv) {
    if (argc != 5) return 2;
    int runs = atoi(argv[2]), steps = atoi(argv[3]), size = atoi(argv[4]);
    double first_open, second_open;
    sdrt_context *ctx = open_context(argv[1], &first_open); /* starts the interpreter, imports sdrt */
    sdrt_context *other = open_context(argv[1], &second_open);
    sdrt_context_close(other);
    double first_generate = generate(ctx, steps, size); /* opens the engines */
    printf("{\"first_open_us\": %.1f, \"second_open_us\": %.1f, \"first_generate_us\": %.1f, \"generate_us\": [",
           first_open, second_open, first_generate);
    for (int i = 0; i < runs; i++) printf("%s%.1f", i ? ", " : "", generate(ctx, steps, size));
    printf("]}\n");
    sdrt_context_close(ctx);
    return 0;
}
