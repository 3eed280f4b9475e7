//! Build-time check of the PHP C API that this crate declares by hand. ext-php-rs
//! generates the structs (`sapi_module_struct`, `sapi_globals_struct`, ...) from the
//! headers of the PHP being built for, and PHP refuses a module built for another API
//! number, so layouts cannot mismatch. The symbols looked up with dlsym in src/php/
//! are typed by hand: this compiles their expected signatures against the same
//! headers (found with php-config, as ext-php-rs finds them), so a PHP version that
//! changes one stops the build with the symbol's name instead of being called wrongly.

use std::path::PathBuf;
use std::process::Command;

const CHECK: &str = r#"
#include "php.h"
#include "SAPI.h"
#include "rfc1867.h"
#include "php_open_temporary_file.h"
#include "ext/spl/spl_exceptions.h"
#define SAME(e, t) __builtin_types_compatible_p(__typeof__(e), t)

/* src/php/sapi.rs */
#ifndef ZTS
_Static_assert(SAME(&sapi_globals, sapi_globals_struct *), "sapi_globals");
#endif
_Static_assert(SAME(&sapi_module, sapi_module_struct *), "sapi_module");
_Static_assert(SAME(&sapi_getenv, char *(*)(const char *, size_t)), "sapi_getenv");
_Static_assert(SAME(&sapi_read_post_block, size_t (*)(char *, size_t)), "sapi_read_post_block");
_Static_assert(SAME(&display_ini_entries, void (*)(zend_module_entry *)), "display_ini_entries");
_Static_assert(SAME(&_efree, void (*)(void *)), "_efree (a debug build of PHP adds file/line arguments)");
_Static_assert(SAME(&php_get_temporary_directory, const char *(*)(void)), "php_get_temporary_directory");
/* php_rfc1867_callback returns int in PHP 8.2 and zend_result (an int-sized enum) in 8.4:
   the Rust side declares c_int, right for any signed int-sized return type. */
typedef __typeof__(php_rfc1867_callback(0, NULL, NULL)) rfc1867_ret;
_Static_assert(sizeof(rfc1867_ret) == sizeof(int) && (rfc1867_ret)-1 < 0, "php_rfc1867_callback return type");
_Static_assert(SAME(php_rfc1867_callback, rfc1867_ret (*)(unsigned int, void *, void **)), "php_rfc1867_callback");
_Static_assert(MULTIPART_EVENT_START == 0 && MULTIPART_EVENT_END == 5, "MULTIPART_EVENT_* (src/php/recorder.rs)");
_Static_assert(SUCCESS == 0, "SUCCESS");
/* src/php/constants.rs, src/php/errors.rs */
_Static_assert(SAME(&zend_get_constant_str, zval *(*)(const char *, size_t)), "zend_get_constant_str");
_Static_assert(SAME(&spl_ce_RuntimeException, zend_class_entry **), "spl_ce_RuntimeException");
_Static_assert(SAME(&spl_ce_InvalidArgumentException, zend_class_entry **), "spl_ce_InvalidArgumentException");
"#;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["PHP_CONFIG", "PATH", "CC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("DOCS_RS").is_some() {
        return;
    }
    let php_config = std::env::var("PHP_CONFIG").unwrap_or_else(|_| "php-config".to_owned());
    let includes = match Command::new(&php_config).arg("--includes").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => panic!("upload_progress: `{php_config} --includes` failed (install php-dev for the PHP version to build for, or set PHP_CONFIG)"),
    };
    let includes: Vec<&str> = includes.split_whitespace().collect();
    // Re-check when the headers change (another PHP installed under the same php-config).
    if let Some(dir) = includes.first().and_then(|i| i.strip_prefix("-I")) {
        println!("cargo:rerun-if-changed={dir}/main/php_version.h");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = out_dir.join("php_abi_check.c");
    std::fs::write(&src, CHECK).expect("write php_abi_check.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let out = Command::new(&cc)
        .args(["-fsyntax-only", "-std=gnu11", "-w"])
        .args(&includes)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("upload_progress: cannot run the C compiler `{cc}`: {e}"));
    if !out.status.success() {
        panic!(
            "upload_progress: the PHP C API found with `{php_config}` differs from what src/php/ declares:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let zts = Command::new(&php_config)
        .arg("--configure-options")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--enable-zts"))
        .unwrap_or(false);
    if zts {
        println!("cargo:warning=upload_progress: this PHP is thread-safe (ZTS): the extension will refuse to load until ZTS is supported");
    }
}
