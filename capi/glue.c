/* The C half of libsdrt, compiled by cffi into the library (capi/build.py): argument and struct_size
 * checks, per-context locks and cancel counters, thread-local errors, image memory, and (pyenv.c) finding
 * the Python environment before cffi starts the interpreter.  Everything else runs in Python
 * (sdrt/capi_impl.py) through the `sdrt__py_*` entry points cffi generates from capi/build.py.
 * SDRT_BAKED_* and SDRT_VERSION_STRING are defined by capi/build.py; the state, errors and checks under the
 * API are capi/helpers.c's. */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sdrt.h"

#include "helpers.c" /* the context struct, errors, struct_size checks, image memory */

/* ------------------------------------------------------------------ the API (capi/sdrt.h) */

SDRT_API uint32_t sdrt_abi_version(void) { return SDRT_ABI_VERSION; }

SDRT_API const char *sdrt_version(void) { return SDRT_VERSION_STRING; }

SDRT_API void sdrt_context_params_init(sdrt_context_params *p) {
    if (p == NULL) return;
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->log_level = SDRT_LOG_WARNING;
}

SDRT_API void sdrt_generate_params_init(sdrt_generate_params *p) {
    if (p == NULL) return;
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->mode = "txt2img";
    p->steps = 30;
    p->batch = 1;
    p->guidance = 7.5f;
    p->strength = SDRT_STRENGTH_DEFAULT;
    p->seed = -1;
    p->control_end = 1.0f;
    p->prior_guidance = SDRT_PRIOR_GUIDANCE_DEFAULT;
}

SDRT_API sdrt_status sdrt_context_open(const sdrt_context_params *p, sdrt_context **out) {
    sdrt_context_params q;
    sdrt_status status;
    sdrt__set_error(NULL, "");
    if (out == NULL) return fail(NULL, SDRT_ERR_INPUT, "sdrt_context_open: out is NULL");
    *out = NULL;
    if (p == NULL) return fail(NULL, SDRT_ERR_INPUT, "sdrt_context_open: params is NULL");
    sdrt_context_params_init(&q);
    if ((status = normalize(NULL, p, &q, sizeof q, context_layouts, COUNT(context_layouts), "sdrt_context_params")))
        return status;
    if (q.engine_dir == NULL) return fail(NULL, SDRT_ERR_INPUT, "sdrt_context_params.engine_dir is NULL");
    if ((status = python_ready(NULL))) return status;
    sdrt_context *ctx = calloc(1, sizeof *ctx);
    char *error = calloc(1, ERROR_MAX);
    if (ctx == NULL || error == NULL) {
        free(ctx);
        free(error);
        return fail(NULL, SDRT_ERR_INTERNAL, "sdrt_context_open: out of memory");
    }
    ctx->error = error;
    __atomic_store_n(&ctx->magic, CONTEXT_MAGIC, __ATOMIC_RELEASE);
    pthread_mutex_init(&ctx->call_lock, NULL);
    pthread_mutex_init(&ctx->text_lock, NULL);
    pthread_cond_init(&ctx->idle, NULL);
    frame f;
    enter(ctx, &f);
    status = from_python(NULL, sdrt__py_open(ctx, &q));
    leave(&f);
    if (status != SDRT_OK) { /* never handed out: freed whole */
        pthread_mutex_destroy(&ctx->call_lock);
        pthread_mutex_destroy(&ctx->text_lock);
        pthread_cond_destroy(&ctx->idle);
        free(ctx->error);
        free(ctx);
        return status;
    }
    *out = ctx;
    return SDRT_OK;
}

SDRT_API sdrt_status sdrt_generate(sdrt_context *ctx, const sdrt_generate_params *p, sdrt_image **images_out,
                                   int *count_out, int64_t *seed_out) {
    sdrt_generate_params q;
    sdrt_status status;
    sdrt_image *images = NULL;
    int count = 0;
    int64_t seed = -1;
    sdrt__set_error(NULL, "");
    if (images_out) *images_out = NULL;
    if (count_out) *count_out = 0;
    if (ctx == NULL) return fail(NULL, SDRT_ERR_INPUT, "sdrt_generate: ctx is NULL");
    if (!context_ok(ctx))
        return fail(NULL, SDRT_ERR_INPUT, "sdrt_generate: ctx is %s",
                    __atomic_load_n(&ctx->magic, __ATOMIC_ACQUIRE) == CLOSED_MAGIC
                        ? "closed (sdrt_context_close was called)" : "not an open sdrt_context");
    if (images_out == NULL || count_out == NULL)
        return fail(ctx, SDRT_ERR_INPUT, "sdrt_generate: images_out and count_out must not be NULL");
    if (p == NULL) return fail(ctx, SDRT_ERR_INPUT, "sdrt_generate: params is NULL");
    sdrt_generate_params_init(&q);
    if ((status = normalize(ctx, p, &q, sizeof q, generate_layouts, COUNT(generate_layouts), "sdrt_generate_params")))
        return status;
    if (q.prompt == NULL) return fail(ctx, SDRT_ERR_INPUT, "sdrt_generate_params.prompt is NULL");
    uint32_t epoch = __atomic_load_n(&ctx->cancel_epoch, __ATOMIC_SEQ_CST);
    frame f;
    if (enter(ctx, &f))
        return fail(ctx, SDRT_ERR_INPUT, "sdrt_generate called from a callback of the same context");
    pthread_mutex_lock(&ctx->text_lock);
    int closing = ctx->closing;
    ctx->users += !closing;
    pthread_mutex_unlock(&ctx->text_lock);
    if (closing) {
        leave(&f);
        return fail(NULL, SDRT_ERR_CANCELLED, "sdrt_generate: the context is being closed");
    }
    pthread_mutex_lock(&ctx->call_lock);
    if ((status = python_ready(ctx)) == SDRT_OK) {
        sdrt__set_error(ctx, "");
        status = from_python(ctx, sdrt__py_generate(ctx, &q, epoch, &images, &count, &seed));
    }
    pthread_mutex_unlock(&ctx->call_lock);
    pthread_mutex_lock(&ctx->text_lock);
    if (--ctx->users == 0 && ctx->closing) pthread_cond_broadcast(&ctx->idle);
    pthread_mutex_unlock(&ctx->text_lock);
    leave(&f);
    if (status != SDRT_OK) {
        sdrt_images_free(images, count);
        return status;
    }
    *images_out = images;
    *count_out = count;
    if (seed_out) *seed_out = seed;
    return SDRT_OK;
}

SDRT_API void sdrt_images_free(sdrt_image *images, int count) {
    if (images == NULL) return;
    for (int i = 0; i < count; i++) free(images[i].data);
    free(images);
}

SDRT_API sdrt_status sdrt_image_save_png(const sdrt_image *image, const char *path, const char *parameters) {
    sdrt_status status;
    sdrt__set_error(NULL, "");
    if (image == NULL) return fail(NULL, SDRT_ERR_INPUT, "sdrt_image_save_png: image is NULL");
    if (path == NULL) return fail(NULL, SDRT_ERR_INPUT, "sdrt_image_save_png: path is NULL");
    if ((status = python_ready(NULL))) return status;
    return from_python(NULL, sdrt__py_save_png(image, path, parameters));
}

SDRT_API void sdrt_cancel(sdrt_context *ctx) {
    if (ctx != NULL) __atomic_fetch_add(&ctx->cancel_epoch, 1, __ATOMIC_SEQ_CST);
}

SDRT_API const char *sdrt_last_error(const sdrt_context *ctx) {
    if (ctx == NULL) return tls_error;
    uint32_t magic = __atomic_load_n(&ctx->magic, __ATOMIC_ACQUIRE);
    if (magic != CONTEXT_MAGIC && magic != CLOSED_MAGIC) return "sdrt_last_error: ctx is not an sdrt_context";
    pthread_mutex_lock((pthread_mutex_t *)&ctx->text_lock);
    if (ctx->error != NULL) copy_text(tls_view, ctx->error);
    else copy_text(tls_view, "sdrt_last_error: ctx is closed (sdrt_context_close was called)");
    pthread_mutex_unlock((pthread_mutex_t *)&ctx->text_lock);
    return tls_view;
}

SDRT_API void sdrt_context_close(sdrt_context *ctx) {
    frame f;
    sdrt__set_error(NULL, "");
    if (!context_ok(ctx)) return;
    if (enter(ctx, &f)) {
        fail(NULL, SDRT_ERR_INPUT, "sdrt_context_close called from a callback of the same context; ignored");
        return;
    }
    pthread_mutex_lock(&ctx->text_lock); /* cancel the generates inside, wait for them to return */
    ctx->closing = 1;
    sdrt_cancel(ctx);
    while (ctx->users > 0) pthread_cond_wait(&ctx->idle, &ctx->text_lock);
    pthread_mutex_unlock(&ctx->text_lock);
    pthread_mutex_lock(&ctx->call_lock);
    if (python_ready(NULL) == SDRT_OK) from_python(NULL, sdrt__py_close(ctx));
    pthread_mutex_lock(&ctx->text_lock); /* what stays: the struct, its locks (see struct sdrt_context) */
    __atomic_store_n(&ctx->magic, CLOSED_MAGIC, __ATOMIC_RELEASE);
    free(ctx->error);
    ctx->error = NULL;
    pthread_mutex_unlock(&ctx->text_lock);
    pthread_mutex_unlock(&ctx->call_lock);
    leave(&f);
}
