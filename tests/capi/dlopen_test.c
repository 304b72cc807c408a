/* A host that loads libsdrt as a plugin, dlopen(RTLD_LOCAL) (as JNI, plugin loaders and Go's plugin
 * package do): Python's extension modules (numpy, onnxruntime) must still find libpython's symbols.
 *
 *   dlopen_test LIBSDRT_SO ENGINE_DIR     prints: status MESSAGE
 */
#include <dlfcn.h>
#include <stdio.h>

#include "sdrt.h"

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        printf("-1 %s\n", dlerror());
        return 1;
    }
    void (*params_init)(sdrt_context_params *);
    sdrt_status (*context_open)(const sdrt_context_params *, sdrt_context **);
    const char *(*last_error)(const sdrt_context *);
    void (*context_close)(sdrt_context *);
    *(void **)&params_init = dlsym(lib, "sdrt_context_params_init");
    *(void **)&context_open = dlsym(lib, "sdrt_context_open");
    *(void **)&last_error = dlsym(lib, "sdrt_last_error");
    *(void **)&context_close = dlsym(lib, "sdrt_context_close");
    sdrt_context_params p;
    sdrt_context *ctx;
    params_init(&p);
    p.engine_dir = argv[2];
    sdrt_status status = context_open(&p, &ctx); /* imports sdrt: numpy, onnxruntime, PIL */
    printf("%d %s\n", (int)status, last_error(NULL));
    if (status == SDRT_OK) context_close(ctx);
    return 0;
}
