/* Finding the Python environment before cffi starts the interpreter (included by capi/helpers.c).
 * SDRT_BAKED_PREFIX, SDRT_BAKED_LIBPYTHON and SDRT_PY_VERSION are defined by capi/build.py. */
static pthread_once_t env_once = PTHREAD_ONCE_INIT;
static int env_ok;
static char env_error[ERROR_MAX];
static char env_home[PATH_MAX], env_program[PATH_MAX + 16];
static const char *env_host_python = "0", *env_log_stderr = "0";

static int is_file(const char *path) { return access(path, R_OK) == 0; }

/* A venv's pyvenv.cfg `home = DIR`: the folder of the base python; its parent is the Python prefix. */
static int read_pyvenv_home(const char *venv) {
    char path[PATH_MAX + 16], line[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/pyvenv.cfg", venv);
    FILE *f = fopen(path, "r");
    if (f == NULL) return 0;
    env_home[0] = '\0';
    while (fgets(line, sizeof line, f)) {
        char *key = line + strspn(line, " \t"), *eq = strchr(line, '=');
        if (eq == NULL || strncmp(key, "home", 4) != 0 || strspn(key + 4, " \t") != (size_t)(eq - key - 4)) continue;
        char *value = eq + 1 + strspn(eq + 1, " \t");
        value[strcspn(value, "\r\n")] = '\0';
        snprintf(env_home, sizeof env_home, "%s", value);
        size_t n = strlen(env_home);
        if (n > 4 && strcmp(env_home + n - 4, "/bin") == 0) env_home[n - 4] = '\0';
    }
    fclose(f);
    return env_home[0] != '\0';
}

/* DIR (SDRT_PYTHONHOME, else the sys.prefix baked at build time) is a virtual environment or a Python
 * prefix.  Python is started as if DIR/bin/python3 ran (its getpath and site find the venv, its
 * pyvenv.cfg and site-packages the usual way); without that file, with DIR as its home. */
static void env_setup(void) {
    /* hosts that dlopen() us RTLD_LOCAL: extension modules (numpy, onnxruntime) need the Python
     * symbols global */
    Dl_info self;
    if (SDRT_BAKED_LIBPYTHON[0]) dlopen(SDRT_BAKED_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
    if (dladdr((void *)&env_setup, &self) && self.dli_fname)
        dlopen(self.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
    const char *log = getenv("SDRT_LOG_STDERR");
    env_log_stderr = (log && strcmp(log, "1") == 0) ? "1" : "0";
    if (Py_IsInitialized()) { /* the host runs Python: use its interpreter as it is */
        env_host_python = "1";
        env_ok = 1;
        return;
    }
    const char *override = getenv("SDRT_PYTHONHOME");
    const char *dir = override && override[0] ? override : SDRT_BAKED_PREFIX;
    const char *origin = override && override[0] ? "SDRT_PYTHONHOME" : "built in";
    if (!read_pyvenv_home(dir)) snprintf(env_home, sizeof env_home, "%s", dir);
    char landmark[PATH_MAX + 32];
    snprintf(landmark, sizeof landmark, "%s/lib/python%s/os.py", env_home, SDRT_PY_VERSION);
    if (!is_file(landmark)) { /* Py_InitializeEx would abort the process */
        snprintf(env_error, sizeof env_error,
                 "libsdrt: no Python %s standard library at %s (Python environment %s, %s); set "
                 "SDRT_PYTHONHOME to a virtual environment or Python %s prefix with sdrt installed, or "
                 "rebuild with `make capi`", SDRT_PY_VERSION, landmark, dir, origin, SDRT_PY_VERSION);
        return;
    }
    snprintf(env_program, sizeof env_program, "%s/bin/python%s", dir, SDRT_PY_VERSION);
    if (!is_file(env_program)) snprintf(env_program, sizeof env_program, "%s/bin/python3", dir);
    static wchar_t *program, *home; /* kept for the process's life, as Python requires */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    if (is_file(env_program) && (program = Py_DecodeLocale(env_program, NULL)) != NULL)
        Py_SetProgramName(program);
    else if ((home = Py_DecodeLocale(env_home, NULL)) != NULL)
        Py_SetPythonHome(home);
#pragma GCC diagnostic pop
    env_ok = 1;
}

/* Python reads the environment found above (capi/_init.py). */
const char *sdrt__env(int key) {
    switch (key) {
    case 0: return env_program;
    case 3: return env_host_python;
    case 4: return env_log_stderr;
    default: return "";
    }
}

