/* capi_test.c's list options for the fields of sdrt_generate_params' third layout (ControlNet, run-time LoRA,
 * Kandinsky's prior); included by capi_test.c after its opts / opt / read_pnm. */
typedef struct {
    sdrt_image controls[4];
    float scales[4], weights[4];
    const char *paths[4];
    char control_buf[2048], scale_buf[256], lora_buf[4096];
} lists;

static int split(char *text, char **items, int max) { /* "a,b,c" in place */
    int n = 0;
    char *save = NULL;
    for (char *t = strtok_r(text, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save)) items[n++] = t;
    return n;
}

static void set_lists(sdrt_generate_params *p, const opts *o, lists *l) {
    char *items[4];
    int n;
    if (opt(o, "control", NULL)) {
        snprintf(l->control_buf, sizeof l->control_buf, "%s", opt(o, "control", ""));
        n = split(l->control_buf, items, 4);
        for (int i = 0; i < n; i++) read_pnm(items[i], &l->controls[i]);
        p->control_images = l->controls, p->control_count = n;
    }
    if (opt(o, "control_scales", NULL)) {
        snprintf(l->scale_buf, sizeof l->scale_buf, "%s", opt(o, "control_scales", ""));
        n = split(l->scale_buf, items, 4);
        for (int i = 0; i < n; i++) l->scales[i] = strtof(items[i], NULL);
        p->control_scales = l->scales;
    }
    p->control_start = strtof(opt(o, "control_start", "0"), NULL);
    p->control_end = strtof(opt(o, "control_end", "1"), NULL);
    p->guess_mode = atoi(opt(o, "guess_mode", "0"));
    p->control_count = atoi(opt(o, "control_count", "-9")) == -9 ? p->control_count : atoi(opt(o, "control_count", ""));
    if (opt(o, "lora", NULL)) {
        snprintf(l->lora_buf, sizeof l->lora_buf, "%s", opt(o, "lora", ""));
        n = split(l->lora_buf, items, 4);
        for (int i = 0; i < n; i++) {
            char *colon = strrchr(items[i], ':');
            l->weights[i] = colon ? strtof(colon + 1, NULL) : 1.0f;
            if (colon) *colon = '\0', p->lora_weights = l->weights;
            l->paths[i] = items[i];
        }
        p->lora_paths = l->paths, p->lora_count = n;
    }
    p->lora_count = atoi(opt(o, "lora_count", "-9")) == -9 ? p->lora_count : atoi(opt(o, "lora_count", ""));
    p->prior_steps = atoi(opt(o, "prior_steps", "0"));
    p->prior_guidance = strtof(opt(o, "prior_guidance", "-1"), NULL);
}

