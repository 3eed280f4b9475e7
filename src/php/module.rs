//! Module lifecycle: MINIT/MSHUTDOWN/RINIT/RSHUTDOWN. Each hook body runs in
//! `catch_unwind`: a panic must never unwind into the engine.

use crate::php::{ini, recorder};
use std::panic::catch_unwind;

pub extern "C" fn startup(_ty: i32, module_number: i32) -> i32 {
    // Refuse to start (PHP then stops with "Unable to start upload_progress module")
    // rather than hook a PHP this build does not fit.
    match catch_unwind(crate::php::sapi::unsupported) {
        Ok(None) => {}
        Ok(Some(why)) => {
            ext_php_rs::error::php_error(
                &ext_php_rs::flags::ErrorType::CoreWarning,
                &format!("upload_progress: {why}"),
            );
            return -1;
        }
        Err(_) => return -1,
    }
    let ok = catch_unwind(|| {
        ini::register(module_number);
        recorder::install_hooks();
    });
    if ok.is_ok() {
        0
    } else {
        -1
    }
}

pub extern "C" fn shutdown(_ty: i32, _module_number: i32) -> i32 {
    let _ = catch_unwind(recorder::uninstall_hooks);
    0
}

static CLASSES_FIXED: std::sync::Once = std::sync::Once::new();

pub extern "C" fn request_startup(_ty: i32, _module_number: i32) -> i32 {
    let _ = catch_unwind(|| {
        // Class entries are registered after our MINIT callback returns, so the
        // first request (once per process, before any script) finishes them.
        CLASSES_FIXED.call_once(crate::php::errors::use_parent_constructors);
        // A chunk write a bailout jumped over must not keep its lock into this request.
        crate::storage::release_abandoned();
        recorder::request_startup();
    });
    0
}
