//! PHP symbols that ext-php-rs does not bind, or that must not be referenced
//! at link time: data symbols such as `sapi_module` would make the library
//! fail to load outside PHP (cargo-php loads it to generate stubs), so every
//! one of them is looked up with dlsym when the module starts.

use ext_php_rs::ffi::{sapi_globals_struct, sapi_module_struct, zend_module_entry};
use once_cell::sync::OnceCell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

pub type ReadPostFn = unsafe extern "C" fn(buffer: *mut c_char, count: usize) -> usize;
pub type Rfc1867Fn =
    unsafe extern "C" fn(event: c_uint, event_data: *mut c_void, extra: *mut *mut c_void) -> c_int;
pub type DeactivateFn = unsafe extern "C" fn() -> c_int;
type SapiGetenvFn = unsafe extern "C" fn(name: *const c_char, len: usize) -> *mut c_char;
type ReadPostBlockFn = unsafe extern "C" fn(buffer: *mut c_char, len: usize) -> usize;
type DisplayIniFn = unsafe extern "C" fn(module: *mut zend_module_entry);
type EfreeFn = unsafe extern "C" fn(ptr: *mut c_void);
type TempDirFn = unsafe extern "C" fn() -> *const c_char;

/// The resolved symbols; `None` for any the running binary does not export.
pub struct Symbols {
    pub sapi_module: *mut sapi_module_struct,
    pub sapi_globals: *mut sapi_globals_struct,
    pub rfc1867_callback: *mut Option<Rfc1867Fn>,
    getenv: Option<SapiGetenvFn>,
    read_post_block: Option<ReadPostBlockFn>,
    display_ini: Option<DisplayIniFn>,
    efree: Option<EfreeFn>,
    temp_dir: Option<TempDirFn>,
}

// SAFETY: the pointers are process-wide PHP globals; they are only
// dereferenced on the PHP thread (NTS builds have exactly one).
unsafe impl Send for Symbols {}
unsafe impl Sync for Symbols {}

static SYMBOLS: OnceCell<Symbols> = OnceCell::new();

fn lookup(name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

fn lookup_fn<F: Copy>(name: &CStr) -> Option<F> {
    let p = lookup(name);
    if p.is_null() {
        return None;
    }
    debug_assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: the symbol is a function with the signature F declares (PHP 8.2 headers).
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

/// Resolves everything once (MINIT).
pub fn init() -> &'static Symbols {
    SYMBOLS.get_or_init(|| Symbols {
        sapi_module: lookup(c"sapi_module").cast(),
        sapi_globals: lookup(c"sapi_globals").cast(),
        rfc1867_callback: lookup(c"php_rfc1867_callback").cast(),
        getenv: lookup_fn(c"sapi_getenv"),
        read_post_block: lookup_fn(c"sapi_read_post_block"),
        display_ini: lookup_fn(c"display_ini_entries"),
        efree: lookup_fn(c"_efree"),
        temp_dir: lookup_fn(c"php_get_temporary_directory"),
    })
}

/// Why this PHP cannot run the extension, checked in MINIT before anything is hooked:
/// a thread-safe (ZTS) PHP (not supported yet: the hooks keep per-process state and
/// read `sapi_globals` as a plain global), or a PHP that lacks a symbol used here.
/// Signatures are checked at build time (build.rs); PHP itself refuses a module built
/// for another API number.
pub fn unsupported() -> Option<String> {
    // tsrm_get_ls_cache is exported by ZTS builds only.
    if ext_php_rs::PHP_ZTS || !lookup(c"tsrm_get_ls_cache").is_null() {
        return Some(
            "thread-safe (ZTS) builds of PHP are not supported yet; use the NTS build \
             (`php -v` shows NTS)"
                .to_owned(),
        );
    }
    const REQUIRED: [&CStr; 11] = [
        c"sapi_module",
        c"sapi_globals",
        c"php_rfc1867_callback",
        c"sapi_getenv",
        c"sapi_read_post_block",
        c"display_ini_entries",
        c"_efree",
        c"php_get_temporary_directory",
        c"zend_get_constant_str",
        c"spl_ce_RuntimeException",
        c"spl_ce_InvalidArgumentException",
    ];
    let missing: Vec<_> = REQUIRED
        .iter()
        .filter(|name| lookup(name).is_null())
        .map(|name| name.to_string_lossy())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "this PHP does not export {}; it is not a supported PHP build",
            missing.join(", ")
        )
    })
}

pub fn get() -> Option<&'static Symbols> {
    SYMBOLS.get()
}

fn cstr_opt(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: PHP strings in SAPI structs are NUL-terminated.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

impl Symbols {
    /// `sapi_module.name`: "fpm-fcgi", "cli-server", "cli", ...
    pub fn sapi_name(&self) -> String {
        if self.sapi_module.is_null() {
            return String::new();
        }
        // SAFETY: sapi_module is a valid global for the life of the process.
        cstr_opt(unsafe { (*self.sapi_module).name }).unwrap_or_default()
    }

    /// Request facts needed by the recorder. Only valid during a request.
    pub fn request(&self) -> Option<RequestInfo> {
        if self.sapi_globals.is_null() {
            return None;
        }
        // SAFETY: sapi_globals is a valid global; fields are read, not kept.
        let ri = unsafe { &(*self.sapi_globals).request_info };
        Some(RequestInfo {
            method: cstr_opt(ri.request_method),
            query_string: cstr_opt(ri.query_string),
            content_length: ri.content_length,
        })
    }

    /// True once PHP (or a post reader) consumed the body into `request_body`.
    pub fn body_already_read(&self) -> bool {
        if self.sapi_globals.is_null() {
            return true;
        }
        // SAFETY: see `request`.
        unsafe {
            let sg = &*self.sapi_globals;
            sg.post_read != 0 || !sg.request_info.request_body.is_null()
        }
    }

    /// A request header (CGI name like `HTTP_X_PROGRESS_ID`) as the SAPI sees it.
    pub fn getenv(&self, name: &str) -> Option<String> {
        let getenv = self.getenv?;
        let cname = std::ffi::CString::new(name).ok()?;
        // SAFETY: sapi_getenv returns an estrdup'ed copy or NULL.
        let p = unsafe { getenv(cname.as_ptr(), name.len()) };
        if p.is_null() {
            return None;
        }
        let value = cstr_opt(p);
        if let Some(efree) = self.efree {
            // SAFETY: p was allocated by emalloc in sapi_getenv.
            unsafe { efree(p.cast()) };
        }
        value
    }

    /// Reads the next block of the request body through the SAPI (and so
    /// through our read_post wrapper); 0 at the end of the body.
    pub fn read_post_block(&self, buf: &mut [u8]) -> usize {
        match self.read_post_block {
            // SAFETY: buf is valid for buf.len() bytes.
            Some(f) => unsafe { f(buf.as_mut_ptr().cast(), buf.len()) },
            None => 0,
        }
    }

    /// # Safety
    /// `module` must be the module entry PHP passed to the info function.
    pub unsafe fn display_ini_entries(&self, module: *mut zend_module_entry) {
        if let Some(f) = self.display_ini {
            // SAFETY: guaranteed by the caller.
            unsafe { f(module) }
        }
    }

    /// `sys_get_temp_dir()`.
    pub fn temp_dir(&self) -> String {
        self.temp_dir
            // SAFETY: returns a static NUL-terminated string.
            .and_then(|f| cstr_opt(unsafe { f() }))
            .unwrap_or_else(|| "/tmp".to_owned())
    }
}

pub struct RequestInfo {
    pub method: Option<String>,
    pub query_string: Option<String>,
    pub content_length: i64,
}
