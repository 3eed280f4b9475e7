//! Reads PHP constants (PHP_BINDIR, ...) through `zend_get_constant_str`,
//! resolved at run time like every symbol ext-php-rs does not bind.

use ext_php_rs::types::Zval;
use std::ffi::c_char;

type GetConstantStr = unsafe extern "C" fn(name: *const c_char, len: usize) -> *mut Zval;

/// Values of the named constants as strings (None when undefined).
pub fn read(names: &[&str]) -> Vec<Option<String>> {
    // SAFETY: dlsym of a PHP API function with the declared signature.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"zend_get_constant_str".as_ptr()) };
    if f.is_null() {
        return names.iter().map(|_| None).collect();
    }
    // SAFETY: the symbol has the GetConstantStr signature in PHP 8.
    let get: GetConstantStr =
        unsafe { std::mem::transmute::<*mut libc::c_void, GetConstantStr>(f) };
    names
        .iter()
        .map(|name| {
            // SAFETY: name pointer/length pair; the result is NULL or a zval owned by PHP.
            let zv = unsafe { get(name.as_ptr().cast(), name.len()) };
            if zv.is_null() {
                return None;
            }
            // SAFETY: non-null zval pointer owned by the constants table.
            let zv = unsafe { &*zv };
            zv.string().or_else(|| zv.long().map(|n| n.to_string()))
        })
        .collect()
}
