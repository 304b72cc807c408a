/* The C side of tests/test_capi.py: runs a script of libsdrt calls and prints one JSON line per call.
 *
 *   capi_test SCRIPT      (one command a line, fields separated by tabs; "key=value" options)
 * A "\\n" in a value stands for a newline.
 * Output: one JSON object a line (results, and {"log": slot, ...} for log callback messages).
 *
 *   open SLOT [engine_dir= backend= threads= log=1 log_level= struct_size=v1|v1-1|v1+4|big0|bigx|N]
 *   gen SLOT [mode= prompt=|prompt=NULL negative= scheduler= vae= rng= width= height= steps= batch= guidance=
 *             strength= seed= image=F.ppm mask=F.pgm out=PREFIX cancel_at=K thread_cancel_at=K reenter_at=K
 *             close_at=K (another thread closes the context at step K)
 *             control=A.ppm[,B.ppm] control_scales=S[,S2] control_start= control_end= guess_mode= control_count=
 *             lora=PATH[:W][,PATH2[:W2]] lora_count= prior_steps= prior_guidance=
 *             struct_size=...|v2|v2+4|v3 null=ctx|params|images_out|count_out|seed_out]
 *   parallel SLOT_A SLOT_B [gen options; outA= outB= seedA= seedB=]   (two threads, at once)
 *   parallel_open SLOT_A SLOT_B [open options]                        (two threads, at once)
 *   cycles SLOT n=N [gen options]        (N generate/free cycles; RSS after N/10 and after N)
 *   save [image=F.ppm|NULL path=|NULL parameters=]
 *   close SLOT
 *   cancel SLOT                          (sdrt_cancel with no generate running)
 *   stale SLOT                           (every call on the context the last "close SLOT" closed)
 *   nulls                                (NULL arguments everywhere)
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sdrt.h"

#define MAX_OPTS 32
typedef struct { int n; char *key[MAX_OPTS], *value[MAX_OPTS]; } opts;
static sdrt_context *slots[8], *closed_slots[8];
static int line_no;

static const char *opt(const opts *o, const char *key, const char *fallback) {
    for (int i = 0; i < o->n; i++)
        if (strcmp(o->key[i], key) == 0) return o->value[i];
    return fallback;
}

/* a JSON string (escaped) into a rotating static buffer */
static const char *js(const char *text) {
    static char bufs[8][4200];
    static int next;
    char *out = bufs[next++ % 8], *o = out;
    if (text == NULL) return "null";
    *o++ = '"';
    for (const unsigned char *c = (const unsigned char *)text; *c && o < out + 4190; c++) {
        if (*c == '"' || *c == '\\') *o++ = '\\', *o++ = (char)*c;
        else if (*c < 0x20) o += sprintf(o, "\\u%04x", *c);
        else *o++ = (char)*c;
    }
    *o++ = '"';
    *o = '\0';
    return out;
}

/* one JSON object a line: {"line", "what", "status", "error", extra fields...} */
static void result(const char *what, sdrt_status status, const char *error, const char *extra) {
    printf("{\"line\": %d, \"what\": %s, \"status\": %d, \"error\": %s%s%s}\n", line_no, js(what), (int)status,
           js(error), extra ? ", " : "", extra ? extra : "");
    fflush(stdout);
}

/* ---------------------------------------------------------------- PPM files */

static int read_pnm(const char *path, sdrt_image *image) {
    FILE *f = fopen(path, "rb");
    char magic[3] = {0};
    unsigned w, h, maxval;
    if (!f || fscanf(f, "%2s %u %u %u", magic, &w, &h, &maxval) != 4 || fgetc(f) == EOF) return -1;
    image->channels = strcmp(magic, "P6") == 0 ? 3 : 1;
    image->width = w, image->height = h;
    image->data = malloc((size_t)w * h * image->channels);
    size_t n = fread(image->data, 1, (size_t)w * h * image->channels, f);
    fclose(f);
    return n == (size_t)w * h * image->channels ? 0 : -1;
}

static void write_ppm(const char *path, const sdrt_image *image) {
    FILE *f = fopen(path, "wb");
    fprintf(f, "P6\n%u %u\n255\n", (unsigned)image->width, (unsigned)image->height);
    fwrite(image->data, 1, (size_t)image->width * image->height * 3, f);
    fclose(f);
}

#include "capi_lists.h" /* the V3 fields' options: control=, control_scales=, lora=, ... */

/* ---------------------------------------------------------------- callbacks */

typedef struct {
    sdrt_context *ctx;
    int steps, total, cancel_at, thread_cancel_at, reenter_at, reenter_status, close_at;
    pthread_t closer;
} progress_state;

static void *close_thread(void *ctx) {
    sdrt_context_close((sdrt_context *)ctx); /* cancels the running generate, waits for it, frees ctx */
    return NULL;
}

static void *cancel_thread(void *ctx) {
    sdrt_cancel((sdrt_context *)ctx);
    return NULL;
}

static int on_progress(int step, int total, void *user_data) {
    progress_state *s = user_data;
    s->steps = step, s->total = total;
    if (step == s->thread_cancel_at) { /* sdrt_cancel from another thread while this generate runs */
        pthread_t t;
        pthread_create(&t, NULL, cancel_thread, s->ctx);
        pthread_join(t, NULL);
    }
    if (step == s->close_at) pthread_create(&s->closer, NULL, close_thread, s->ctx);
    if (step == s->reenter_at) { /* re-entering the same context from its callback: refused, no deadlock */
        sdrt_generate_params p;
        sdrt_image *images;
        int count;
        sdrt_generate_params_init(&p);
        p.prompt = "inner";
        s->reenter_status = sdrt_generate(s->ctx, &p, &images, &count, NULL);
        sdrt_context_close(s->ctx); /* ignored the same way */
    }
    return step == s->cancel_at;
}

static void on_log(int level, const char *message, void *user_data) {
    printf("{\"log\": %d, \"level\": %d, \"message\": %s}\n", (int)(intptr_t)user_data, level, js(message));
    fflush(stdout);
}

/* ---------------------------------------------------------------- struct_size variants */

/* A caller's struct: the library's layout, then `extra` bytes a newer header would add. */
typedef struct { sdrt_generate_params p; unsigned char extra[16]; } bigger_generate;
typedef struct { sdrt_context_params p; unsigned char extra[16]; } bigger_context;

static uint32_t struct_size(const char *spec, size_t v1, size_t full, unsigned char *extra) {
    if (strcmp(spec, "v1") == 0) return (uint32_t)v1;
    if (strcmp(spec, "v1-1") == 0) return (uint32_t)v1 - 1;
    if (strcmp(spec, "v1+4") == 0) return (uint32_t)v1 + 4; /* half of the first added field */
    if (strcmp(spec, "big0") == 0) return (uint32_t)full + 16;
    if (strcmp(spec, "bigx") == 0) { extra[3] = 1; return (uint32_t)full + 16; }
    return (uint32_t)strtoul(spec, NULL, 10);
}

/* ---------------------------------------------------------------- commands */

static void cmd_open(int slot, const opts *o) {
    bigger_context c;
    memset(&c, 0, sizeof c);
    sdrt_context_params_init(&c.p);
    c.p.engine_dir = opt(o, "engine_dir", NULL);
    c.p.backend = opt(o, "backend", NULL);
    c.p.threads = atoi(opt(o, "threads", "0"));
    if (atoi(opt(o, "log", "0"))) c.p.log = on_log, c.p.log_user_data = (void *)(intptr_t)slot;
    c.p.log_level = atoi(opt(o, "log_level", "30"));
    const char *size = opt(o, "struct_size", NULL);
    if (size) {
        c.p.struct_size = struct_size(size, SDRT_CONTEXT_PARAMS_SIZE_V1, sizeof c.p, c.extra);
        if (strcmp(size, "v1") == 0) c.p.log_level = 12345; /* beyond struct_size: must not be read */
    }
    sdrt_status status = sdrt_context_open(&c.p, &slots[slot]);
    char extra[64];
    snprintf(extra, sizeof extra, "\"opened\": %d", slots[slot] != NULL);
    result("open", status, sdrt_last_error(NULL), extra);
}

typedef struct {
    int slot;
    const opts *o;
} open_job;

static void *run_open(void *arg) {
    open_job *job = arg;
    cmd_open(job->slot, job->o);
    return NULL;
}

/* Two threads open contexts at once: as the process's first calls, they race to start Python. */
static void cmd_parallel_open(int a, int b, const opts *o) {
    open_job jobs[2] = {{a, o}, {b, o}};
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, run_open, &jobs[i]);
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
}

typedef struct {
    int slot;
    const opts *o;
    const char *out, *seed;
    sdrt_status status;
    char line[4096];
} gen_job;

static void *run_gen(void *arg) {
    gen_job *job = arg;
    const opts *o = job->o;
    sdrt_context *ctx = slots[job->slot];
    bigger_generate g;
    memset(&g, 0, sizeof g);
    sdrt_generate_params *p = &g.p;
    sdrt_generate_params_init(p);
    sdrt_image init = {0}, mask = {0};
    progress_state s = {ctx, 0, 0, atoi(opt(o, "cancel_at", "0")), atoi(opt(o, "thread_cancel_at", "0")),
                        atoi(opt(o, "reenter_at", "0")), -1, atoi(opt(o, "close_at", "0")), 0};
    p->mode = opt(o, "mode", "txt2img");
    p->prompt = opt(o, "prompt", "a photo of a cat");
    if (strcmp(p->prompt, "NULL") == 0) p->prompt = NULL;
    p->negative_prompt = opt(o, "negative", NULL);
    p->scheduler = opt(o, "scheduler", NULL);
    p->vae = opt(o, "vae", NULL);
    p->rng = opt(o, "rng", NULL);
    p->width = atoi(opt(o, "width", "0"));
    p->height = atoi(opt(o, "height", "0"));
    p->steps = atoi(opt(o, "steps", "30"));
    p->batch = atoi(opt(o, "batch", "1"));
    p->guidance = strtof(opt(o, "guidance", "7.5"), NULL);
    p->strength = strtof(opt(o, "strength", "-1"), NULL);
    p->seed = strtoll(job->seed ? job->seed : opt(o, "seed", "-1"), NULL, 10);
    if (opt(o, "image", NULL) && read_pnm(opt(o, "image", NULL), &init) == 0) p->init_image = &init;
    if (opt(o, "mask", NULL) && read_pnm(opt(o, "mask", NULL), &mask) == 0) p->mask_image = &mask;
    if (opt(o, "bad_image", NULL)) { /* an image struct with a bad field */
        init = (sdrt_image){64, 64, 3, NULL};
        if (strcmp(opt(o, "bad_image", ""), "channels") == 0) init = (sdrt_image){64, 64, 2, malloc(64 * 64 * 2)};
        p->init_image = &init;
    }
    lists l;
    memset(&l, 0, sizeof l);
    set_lists(p, o, &l);
    p->progress = on_progress;
    p->user_data = &s;
    const char *size = opt(o, "struct_size", NULL);
    if (size) p->struct_size = struct_size(size, SDRT_GENERATE_PARAMS_SIZE_V1, sizeof *p, g.extra);
    if (size && strcmp(size, "v1+4") == 0) p->vae = (const char *)~(uintptr_t)0; /* half of it is copied */
    if (size && strcmp(size, "v3") == 0) { /* the layout before ControlNet/LoRA/prior: they are not read */
        p->struct_size = (uint32_t)SDRT_GENERATE_PARAMS_SIZE_V3;
        p->prior_steps = 12345, p->lora_count = 3, p->control_count = 2;
    }
    if (size && strncmp(size, "v2", 2) == 0) { /* the layout before rng: rng beyond struct_size is not read */
        p->struct_size = (uint32_t)SDRT_GENERATE_PARAMS_SIZE_V2 + (strcmp(size, "v2+4") == 0 ? 4 : 0);
        p->rng = "not read";
    }
    const char *null = opt(o, "null", "");
    sdrt_image *images = (sdrt_image *)1; /* must be reset to NULL on failure */
    int count = -1;
    int64_t seed = -2;
    job->status = sdrt_generate(strcmp(null, "ctx") ? ctx : NULL, strcmp(null, "params") ? p : NULL,
                                strcmp(null, "images_out") ? &images : NULL, strcmp(null, "count_out") ? &count : NULL,
                                strcmp(null, "seed_out") ? &seed : NULL);
    const char *error = ctx && strcmp(null, "ctx") && !s.close_at ? sdrt_last_error(ctx) : NULL;
    if (s.close_at && s.steps >= s.close_at) {
        pthread_join(s.closer, NULL);
        slots[job->slot] = NULL;
    }
    int w = 0, h = 0, c = 0;
    if (job->status == SDRT_OK) {
        w = images[0].width, h = images[0].height, c = images[0].channels;
        for (int i = 0; job->out && i < count; i++) {
            char path[1024];
            snprintf(path, sizeof path, "%s-%d.ppm", job->out, i);
            write_ppm(path, &images[i]);
        }
        sdrt_images_free(images, count);
    }
    snprintf(job->line, sizeof job->line, "\"count\": %d, \"seed\": %" PRId64 ", \"size\": [%d, %d, %d], "
             "\"steps\": %d, \"total\": %d, \"images_null\": %d, \"reenter_status\": %d, \"thread_error\": %s, "
             "\"ctx_error\": %s", count, seed, w, h, c, s.steps, s.total, images == NULL, s.reenter_status,
             js(sdrt_last_error(NULL)), js(error));
    free(init.data);
    free(mask.data);
    for (int i = 0; i < 4; i++) free(l.controls[i].data);
    return NULL;
}

static void cmd_gen(int slot, const opts *o) {
    gen_job job = {slot, o, opt(o, "out", NULL), NULL, 0, {0}};
    run_gen(&job);
    result("gen", job.status, sdrt_last_error(NULL), job.line);
}

static void cmd_parallel(int a, int b, const opts *o) {
    gen_job jobs[2] = {{a, o, opt(o, "outA", NULL), opt(o, "seedA", NULL), 0, {0}},
                       {b, o, opt(o, "outB", NULL), opt(o, "seedB", NULL), 0, {0}}};
    pthread_t threads[2];
    for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, run_gen, &jobs[i]);
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < 2; i++) result(i ? "parallelB" : "parallelA", jobs[i].status, NULL, jobs[i].line);
}

static long rss_kib(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f && fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    if (f) fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static void cmd_cycles(int slot, const opts *o) {
    int n = atoi(opt(o, "n", "200")), failures = 0;
    long warm = 0;
    gen_job job = {slot, o, NULL, NULL, 0, {0}};
    for (int i = 0; i < n; i++) {
        run_gen(&job);
        failures += job.status != SDRT_OK;
        if (i == n / 10) warm = rss_kib();
    }
    char extra[128];
    snprintf(extra, sizeof extra, "\"n\": %d, \"failures\": %d, \"rss_warm_kib\": %ld, \"rss_end_kib\": %ld",
             n, failures, warm, rss_kib());
    result("cycles", failures ? SDRT_ERR_INTERNAL : SDRT_OK, sdrt_last_error(NULL), extra);
}

static void cmd_save(const opts *o) {
    sdrt_image image = {0};
    const char *file = opt(o, "image", "NULL"), *path = opt(o, "path", "NULL");
    int have = strcmp(file, "NULL") && read_pnm(file, &image) == 0;
    sdrt_status status = sdrt_image_save_png(have ? &image : NULL, strcmp(path, "NULL") ? path : NULL,
                                             opt(o, "parameters", NULL));
    result("save", status, sdrt_last_error(NULL), NULL);
    free(image.data);
}

static void cmd_nulls(void) {
    sdrt_context *ctx = (sdrt_context *)1;
    sdrt_context_params cp;
    sdrt_context_params_init(NULL);
    sdrt_generate_params_init(NULL);
    sdrt_context_params_init(&cp);
    sdrt_status status = sdrt_context_open(NULL, &ctx);
    result("open(NULL,&ctx)", status, sdrt_last_error(NULL), ctx ? "\"ctx\": \"set\"" : "\"ctx\": null");
    result("open(&p,NULL)", sdrt_context_open(&cp, NULL), sdrt_last_error(NULL), NULL);
    result("open(engine_dir NULL)", sdrt_context_open(&cp, &ctx), sdrt_last_error(NULL), NULL);
    cp.struct_size = 0;
    result("open(struct_size 0)", sdrt_context_open(&cp, &ctx), sdrt_last_error(NULL), NULL);
    cp.struct_size = 0xCCCCCCCCu;
    result("open(struct_size garbage)", sdrt_context_open(&cp, &ctx), sdrt_last_error(NULL), NULL);
    sdrt_image image = {8, 8, 3, NULL};
    result("save(data NULL)", sdrt_image_save_png(&image, "x.png", NULL), sdrt_last_error(NULL), NULL);
    sdrt_images_free(NULL, 3);
    sdrt_cancel(NULL);
    sdrt_context_close(NULL);
    const char *e = sdrt_last_error(NULL);
    result("last_error(NULL)", SDRT_OK, e ? e : "(NULL)", NULL);
}

/* Calls on a closed context: refused, never a crash (the handle stays valid memory). */
static void cmd_stale(sdrt_context *ctx) {
    char before[512], extra[1400];
    sdrt_cancel(ctx);
    snprintf(before, sizeof before, "%s", sdrt_last_error(ctx));
    sdrt_generate_params p;
    sdrt_generate_params_init(&p);
    p.prompt = "a photo of a cat";
    sdrt_image *images = (sdrt_image *)1;
    int count = -1;
    sdrt_status status = sdrt_generate(ctx, &p, &images, &count, NULL);
    char error[512];
    snprintf(error, sizeof error, "%s", sdrt_last_error(NULL));
    sdrt_context_close(ctx);
    sdrt_context_close(ctx);
    snprintf(extra, sizeof extra, "\"before\": %s, \"ctx_error\": %s, \"images_null\": %d, \"count\": %d",
             js(before), js(sdrt_last_error(ctx)), images == NULL, count);
    result("stale", status, error, extra);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    FILE *script = fopen(argv[1], "r");
    if (!script) return 2;
    printf("{\"abi\": %u, \"header_abi\": %d, \"version\": %s}\n", (unsigned)sdrt_abi_version(), SDRT_ABI_VERSION,
           js(sdrt_version()));
    char line[8192];
    while (fgets(line, sizeof line, script)) {
        line_no++;
        line[strcspn(line, "\n")] = '\0';
        char *fields[MAX_OPTS + 3];
        int n = 0;
        for (char *tok = strtok(line, "\t"); tok && n < MAX_OPTS + 3; tok = strtok(NULL, "\t")) fields[n++] = tok;
        if (n == 0) continue;
        opts o = {0};
        int positional = 0;
        for (int i = 1; i < n; i++) {
            char *eq = strchr(fields[i], '=');
            if (!eq) { positional++; continue; }
            *eq = '\0';
            for (char *r = eq + 1, *w = eq + 1;; r++, w++) { /* "\\n" in a value: a newline */
                if (r[0] == '\\' && r[1] == 'n') *w = '\n', r++;
                else *w = *r;
                if (!*r) break;
            }
            o.key[o.n] = fields[i], o.value[o.n++] = eq + 1;
        }
        const char *cmd = fields[0];
        int slot = positional > 0 ? atoi(fields[1]) : 0;
        if (strcmp(cmd, "open") == 0) cmd_open(slot, &o);
        else if (strcmp(cmd, "gen") == 0) cmd_gen(slot, &o);
        else if (strcmp(cmd, "parallel") == 0) cmd_parallel(slot, atoi(fields[2]), &o);
        else if (strcmp(cmd, "parallel_open") == 0) cmd_parallel_open(slot, atoi(fields[2]), &o);
        else if (strcmp(cmd, "cycles") == 0) cmd_cycles(slot, &o);
        else if (strcmp(cmd, "save") == 0) cmd_save(&o);
        else if (strcmp(cmd, "stale") == 0) cmd_stale(closed_slots[slot]);
        else if (strcmp(cmd, "close") == 0) { sdrt_context_close(slots[slot]); closed_slots[slot] = slots[slot];
                                              slots[slot] = NULL;
                                              result("close", SDRT_OK, sdrt_last_error(NULL), NULL); }
        else if (strcmp(cmd, "cancel") == 0) { sdrt_cancel(slots[slot]); result("cancel", SDRT_OK, "", NULL); }
        else if (strcmp(cmd, "nulls") == 0) cmd_nulls();
        else result("unknown command", (sdrt_status)-1, cmd, NULL);
    }
    fclose(script);
    return 0;
}
